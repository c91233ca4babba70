"""The state of one IKE SA and what every exchange needs: Message IDs, sending, key derivation, closing.

Theory of operation: the base of :class:`~ipsecstack.ike.session.IkeSa`, which is built in layers
(this core, then :mod:`ike_rekey`, :mod:`child_sa`, :mod:`auth_exchange`, then ``session`` with
IKE_SA_INIT, dispatch and timers); each layer calls only the ones below it. Here: the instance
state, the window-1 request/response machinery (§2.2, §2.3: one outstanding request, cached
responses), SK payload sealing/opening, SKEYSEED derivation (§2.14), NAT detection (§2.23), and
``_close``, which turns the end of the IKE SA into ChildDown/IkeDown events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from ipsecstack.entropy import Rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.const import Flag, Notify
from ipsecstack.ike.groups import Group, KeyExchangeError, KeyPair, KeyPairSource
from ipsecstack.ike.keymat import IkeKeys, ike_sa_keys
from ipsecstack.ike.model import (
    NAT_T_PORT,
    ChildConfig,
    ChildDown,
    ChildFailed,
    ChildUp,
    Datagram,
    Event,
    IkeDown,
    PeerConfig,
    nat_hash,
)
from ipsecstack.ike.pools import Pool
from ipsecstack.ike.state import IkeState, Step, advance

if TYPE_CHECKING:
    from ipsecstack.ike.session import IkeSa


# --- what the outstanding request is for, and the requests waiting for the window -----------------
# Each request the IKE SA sends (RFC 7296 §2.3: one at a time here) is remembered as one of these until
# its response arrives, which goes to the handler of that record's type with the record's own fields.
# Queued requests name what they are about (``subject``), so "is it queued already?" asks about that.
# (Here and not in a module of their own: they hold ChildUp events, and those still hold the IkeSa;
# issue #11 turns each record into the state of its exchange task.)


@dataclass(frozen=True, slots=True)
class NewChild:
    """CREATE_CHILD_SA for another configured child SA (§1.3.1)."""

    child: ChildConfig
    spi_in: int
    nonce: bytes
    dh: Any  # our KE private key (PFS), or None


@dataclass(frozen=True, slots=True)
class RekeyChild:
    """CREATE_CHILD_SA with REKEY_SA for ``old`` (§1.3.3)."""

    old: ChildUp
    spi_in: int
    nonce: bytes
    dh: Any


@dataclass(frozen=True, slots=True)
class DeleteChild:
    """INFORMATIONAL with a Delete for one of our child SAs (§1.4.1)."""

    child: ChildUp


@dataclass(frozen=True, slots=True)
class DeleteSpi:
    """INFORMATIONAL with a Delete for SAs that are not (or no longer) among our children."""


@dataclass(frozen=True, slots=True)
class RekeyIke:
    """CREATE_CHILD_SA rekeying the IKE SA (§1.3.2)."""

    spi: bytes
    nonce: bytes
    priv: Any  # our KE private key


@dataclass(frozen=True, slots=True)
class DeleteOldIke:
    """INFORMATIONAL with a Delete for the IKE SA a rekey replaced (§2.8)."""


@dataclass(frozen=True, slots=True)
class Dpd:
    """An empty INFORMATIONAL: is the peer alive (§1.4)?"""


Pending = NewChild | RekeyChild | DeleteChild | DeleteSpi | RekeyIke | DeleteOldIke | Dpd


@dataclass(frozen=True, slots=True)
class Queued:
    """A request waiting for the window: what it is about, and the method that sends it (subject, now)."""

    send: Callable[[Any, float], None]
    subject: object


class IkeSaCore:
    def __init__(self, cfg: PeerConfig, *, initiator: bool, rng: Rng, now: float, remote: str | None = None,
                 remote_port: int | None = None, wallclock: Callable[[], float] | None = None,
                 keypairs: KeyPairSource | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        # responder: the connections IKE_SA_INIT left possible; IKE_AUTH may switch ``cfg`` to one of them (profiles)
        self.candidates: list[PeerConfig] = [cfg]
        self.switched_from: str | None = None  # the connection IKE_SA_INIT answered with, if IKE_AUTH switched
        # who we authenticate as: local.id, or (responder) the IDr the peer asked for when it is in our certificate
        self.local_identity: tuple[int, bytes] = cfg.local_id
        self.wallclock = wallclock  # seconds since the epoch, for certificate validity (certs only)
        self.peer_cert: x509.Certificate | None = None
        self.send_initial_contact = True  # §2.4: only when we hold no other IKE SA with this peer (the manager knows)
        self.peer_auth = ""  # how the peer proved itself: "psk" or the signature scheme, for logs and listings
        self._peer_hashes: frozenset[int] | None = None  # RFC 7427 §4: None until the peer announces them
        self.initiator = initiator
        self.rng = rng
        self.keypairs = keypairs  # KE key pairs made ahead of time (the runtime's pool), else from rng
        self.created = now
        self.remote = remote or cfg.remote_addr or ""
        self.remote_port = remote_port or cfg.remote_port
        self.local_port = cfg.local_port
        self.state = IkeState.NEW
        self.spi_i = b""
        self.spi_r = bytes(8)
        self.chosen: props.Chosen | None = None
        self.keys: IkeKeys | None = None
        self.tx: sk.SkKeys | None = None
        self.rx: sk.SkKeys | None = None
        self.nat = False  # ESP goes in UDP (RFC 3948): a NAT was detected, or encapsulation is forced
        self.behind_nat = False  # NAT detection: our address is translated (we send the keepalives)
        self.peer_behind_nat = False  # NAT detection: the peer's address is translated (or it fakes it)
        self.nat_fake = False  # we faked our source hash to force encapsulation (``encap = true``)
        self.peer_id: tuple[int, bytes] | None = None
        self.stats: dict[str, int] = {}
        self._group: Group | None = None
        self._dh: Any = None
        self._pub = b""
        self._ni = b""
        self._nr = b""
        self._init_request = b""
        self._init_response = b""
        self._next_mid = 0
        self._peer_mid = 0
        self._outstanding: tuple[int, bytes, int, float] | None = None  # mid, data, tries, next retransmit
        self._cached_response: tuple[int, bytes] | None = None
        self._out: list[Datagram] = []
        self._events: list[Event] = []
        self._child_spi = 0
        self._child: ChildConfig | None = None
        self._cookie = b""
        self._ke_retries = 0
        self.children: list[ChildUp] = []
        self.last_heard = now
        self._pending: Pending | None = None  # what our outstanding request is for (above)
        self.rekey_at: float | None = None
        self.reauth_at: float | None = None  # when reauth_time is due (ReauthDue; the manager does the rest)
        self._reauth_tries = 0
        self._delete_cause = "local"  # the IkeDown cause once our DELETE is done (delete())
        self.successor: IkeSa | None = None  # set once this IKE SA was rekeyed
        # RFC 7296 §2.8.2 (ike_rekey.py): the new IKE SA of the peer's rekey that came while ours was outstanding,
        # kept until ours ends; whether this SA was made by a rekey and has not taken over (it may be redundant);
        # while deleting, when to stop waiting for the peer's DELETE; new IKE SAs for the manager (spawned())
        self._peer_rekey: IkeSa | None = None
        self._standby = False
        self.linger_until: float | None = None
        self._spawned: list[IkeSa] = []
        self._lease: tuple[Pool, bytes] | None = None
        self.virtual_ip: str | None = None  # what the peer assigned us (client side)
        self._queue: list[Queued] = []  # requests waiting for the window (§2.3)
        self._rekeys_done: dict[int, list[tuple[bytes, bytes, ChildUp, bool]]] = {}
        self.up_at: float | None = None  # when it was established (or took over by rekeying)
        self.expire_at: float | None = None  # hard lifetime: rekey_time + over_time after up_at
        self.initial_contact = False  # responder: the peer's IKE_AUTH carried INITIAL_CONTACT (§2.4)

    @property
    def _sa(self) -> IkeSa:
        """This IKE SA as events name it: every instance is an IkeSa, the layers are never used alone."""
        return cast("IkeSa", self)

    def __repr__(self) -> str:
        return f"<IkeSa {self.cfg.name} {self.spi_i.hex()}_{self.spi_r.hex()} {self.state}>"

    def datagrams(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def spawned(self) -> list[IkeSa]:
        """The IKE SAs our rekey exchanges made since the last call (the manager demultiplexes to them at once,
        before one of them takes over: RFC 7296 §2.8.2)."""
        out, self._spawned = self._spawned, []
        return out

    @property
    def established(self) -> bool:
        return self.state is IkeState.ESTABLISHED

    def _enqueue(self, send: Callable[[Any, float], None], subject: object) -> None:
        """``send(subject, now)`` once the window is free (§2.3): _next_queued runs it."""
        self._queue.append(Queued(send, subject))

    def _step(self, step: Step) -> None:
        """The one way the state changes (ike/state.py's table; anything else is a bug: IllegalTransition)."""
        self.state = advance(self.state, step)

    @property
    def idle(self) -> bool:
        """No request of ours outstanding or queued (the window is free)."""
        return self._outstanding is None and not self._queue

    def _send_request(self, exchange: int, inner: list[m.AnyPayload], now: float) -> None:
        assert self.tx is not None
        flags = Flag.INITIATOR if self.initiator else 0
        msg = m.Message(self.spi_i, self.spi_r, exchange, flags, self._next_mid)
        data = sk.seal(msg, inner, self.tx, self.rng)
        mid = self._next_mid
        self._next_mid += 1
        self._request(mid, data, now)

    def _request(self, mid: int, data: bytes, now: float) -> None:
        self._outstanding = (mid, data, 0, now + self.cfg.retransmit_timeout)
        self._emit(data)

    def _respond(self, req: m.Message, inner: list[m.AnyPayload]) -> None:
        assert self.tx is not None
        flags = Flag.RESPONSE | (Flag.INITIATOR if self.initiator else 0)
        msg = m.Message(self.spi_i, self.spi_r, req.exchange, flags, req.message_id)
        data = sk.seal(msg, inner, self.tx, self.rng)
        self._cached_response = (req.message_id, data)
        self._emit(data)

    def _reply_plain(self, req: m.Message, payloads: list[m.AnyPayload]) -> None:
        """Unprotected IKE_SA_INIT error response (§2.21.1); no state is kept."""
        resp = m.Message(req.spi_i, bytes(8), req.exchange, Flag.RESPONSE, req.message_id, payloads)
        self._emit(resp.encode())

    def _open(self, msg: m.Message) -> list[m.AnyPayload] | None:
        assert self.rx is not None
        try:
            return sk.open_(msg.raw, msg, self.rx)
        except sk.SkError:
            self._drop("sk_invalid")
            return None

    def _emit(self, data: bytes, port: int | None = None) -> None:
        # Only the initiator moves to port 4500 (§2.23); the responder answers wherever requests come from.
        self._out.append(Datagram(data, self.remote, self.remote_port, port if port is not None else self.local_port))

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    failure: str = ""

    def _drop(self, reason: str) -> None:
        self._count(f"dropped_{reason}")

    def _close(self, reason: str, cause: str | None = None) -> None:
        """Forget the IKE SA and its children; ``cause`` (see IkeDown) defaults to "local" once it was
        established and "failed" before."""
        if self.state == "closed":
            return
        if cause is None:
            cause = "local" if self.up_at is not None else "failed"
            if self.state == "deleting":
                cause = self._delete_cause  # our DELETE went unanswered: still why we deleted it
        if self._lease is not None and self.successor is None:
            self._lease[0].release(self._lease[1])  # the address goes back to the pool
            self._lease = None
        self._step(Step.CLOSE)
        self._outstanding = None
        self.linger_until = None
        for c in self.children:
            self._events.append(ChildDown(self._sa, c.spi_in, c.spi_out, c.child, "ike"))
        self.children.clear()
        self._events.append(IkeDown(self._sa, reason, cause))
        standby, self._peer_rekey = self._peer_rekey, None
        if standby is not None:  # the peer's rekey of this SA never took over: it goes with it, quietly
            standby._close("its IKE SA closed before a simultaneous rekey was resolved (RFC 7296 §2.8.2)", "rekeyed")

    def _next_queued(self, now: float) -> None:
        """Send the next deferred request once the window (one outstanding request) is free."""
        while self._queue and self._outstanding is None and self.state == "established":
            q = self._queue.pop(0)
            q.send(q.subject, now)

    def _child_failed(self, reason: str, counter: str = "child_failed") -> None:
        self._count(counter)
        self.failure = reason
        self._events.append(ChildFailed(self._sa, reason))

    def _keypair(self, group: Group) -> KeyPair:
        """A KE private value and public data: made ahead of time by ``keypairs`` if it has one, else now."""
        made = self.keypairs(group) if self.keypairs is not None else None
        return made if made is not None else group.generate(self.rng)

    def _new_child_spi(self) -> int:
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 256:
                return spi

    def _answer_ke(self, msg: m.Message, group: Group, ke: m.KE | None) -> tuple[bytes, bytes] | None:
        """Responder's key exchange in CREATE_CHILD_SA (§1.3, §1.2): (our KE data, the shared secret), or
        None once it answered INVALID_KE_PAYLOAD (the group it wants) or INVALID_SYNTAX (a bad public value)."""
        if ke is None or ke.group != group.number:
            self._respond(msg, [m.Notify(Notify.INVALID_KE_PAYLOAD, group.number.to_bytes(2, "big"))])
            return None
        priv, pub = self._keypair(group)
        try:
            return pub, group.shared(priv, ke.data)
        except KeyExchangeError:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return None

    def _derive(self, chosen: props.Chosen, peer_ke: bytes) -> bool:
        assert chosen.dh is not None and chosen.prf is not None
        try:
            shared = chosen.dh.shared(self._dh, peer_ke)
        except KeyExchangeError as e:
            self._close(f"unusable key exchange data: {e}")
            return False
        self.chosen = chosen
        encr_len = chosen.encr.key_len + chosen.encr.salt_len
        integ_len = 0 if chosen.encr.aead or chosen.integ is None else chosen.integ.key_len
        _, keys = ike_sa_keys(chosen.prf, shared, self._ni, self._nr, self.spi_i, self.spi_r, encr_len, integ_len)
        self.keys = keys
        integ = None if chosen.encr.aead else chosen.integ
        i_keys = sk.SkKeys(chosen.encr, integ, keys.sk_ei, keys.sk_ai)
        r_keys = sk.SkKeys(chosen.encr, integ, keys.sk_er, keys.sk_ar)
        self.tx, self.rx = (i_keys, r_keys) if self.initiator else (r_keys, i_keys)
        return True

    def _detect_nat(self, msg: m.Message) -> None:
        src = msg.notify(Notify.NAT_DETECTION_SOURCE_IP)
        dst = msg.notify(Notify.NAT_DETECTION_DESTINATION_IP)
        if src is None or dst is None:
            return
        # the peer's view: its source is (remote, remote_port); our address is its destination
        want_src = nat_hash(msg.spi_i, msg.spi_r if msg.is_response else bytes(8), self.remote, self.remote_port)
        want_dst = nat_hash(msg.spi_i, msg.spi_r if msg.is_response else bytes(8), self.cfg.local_addr,
                            self.local_port)  # fmt: skip
        # §2.23: a different destination hash means *our* address was translated: we are behind the NAT
        # and keep its mapping open with NAT-keepalives (RFC 3948 §2.3)
        if dst.data != want_dst:
            self.behind_nat = True
        if src.data != want_src:
            self.peer_behind_nat = True
        if src.data != want_src or dst.data != want_dst or self.nat:
            self.nat = True
            if self.initiator:
                self.local_port = NAT_T_PORT
                self.remote_port = NAT_T_PORT

    def nat_report(self) -> dict[str, bool]:
        """What NAT detection found (§2.23), and encapsulation forced by config, reported separately."""
        return {"nat_local": self.behind_nat, "nat_remote": self.peer_behind_nat, "encap_forced": self.nat_fake,
                "encap": self.nat}  # fmt: skip

    def _nat_notifies(self) -> list[m.AnyPayload]:
        local = self.cfg.local_addr
        if self.cfg.encap:
            # RFC 7296 §2.23 allows faking the source hash to force UDP encapsulation
            self.nat = self.nat_fake = True
            src_hash = self.rng(20)
        else:
            src_hash = nat_hash(self.spi_i, self.spi_r, local, self.local_port)
        return [
            m.Notify(Notify.NAT_DETECTION_SOURCE_IP, src_hash),
            m.Notify(
                Notify.NAT_DETECTION_DESTINATION_IP, nat_hash(self.spi_i, self.spi_r, self.remote, self.remote_port)
            ),
        ]
