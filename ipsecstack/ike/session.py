"""One IKE SA as a sans-IO state machine (RFC 7296): what the whole SA shares, and its exchange tasks.

Theory of operation
-------------------
An :class:`IkeSa` never touches a socket or a clock. ``receive(data, src, src_port, dst_port, now)``
feeds it a datagram addressed to it (the manager demultiplexes by SPI), ``handle_timer(now)`` lets
it retransmit, rekey, check liveness or give up, and the caller collects what it produced with
``datagrams()`` and ``events()``; ``get_timer()`` says when it next needs the clock. Randomness
comes from the injected ``rng`` (KE key pairs may come ready-made from ``keypairs``), the time of
day for certificate validity from ``wallclock``.

The SA keeps only what the whole SA shares: SPIs, keys and nonces, the peer's address and NAT
state, the Message-ID windows and retransmission (:mod:`window`), its child SAs (records,
:mod:`children`), its timers, the **active task** (the exchange whose request is outstanding) and a
**queue of tasks** waiting for the window (§2.3). Every exchange is a task (:mod:`tasks`): the SA
sends what an initiator task builds and gives it the response; for a peer's request it picks the
responder task (:mod:`tasks.dispatch`), which processes, then builds the response. Its lifecycle is
:mod:`state` (an unlisted step is a bug, IllegalTransition).

A message that does not fit the state is dropped and counted (§2.21); nothing is answered before it
authenticates, except the unprotected IKE_SA_INIT error notifies §2.21.1 allows. A retransmitted
peer request gets the cached response again, byte for byte, and is not processed twice. NAT
traversal (§2.23): if either NAT_DETECTION hash differs, the initiator moves to port 4500 for
everything after IKE_SA_INIT and the child SAs are UDP-encapsulated (:mod:`nat`). Timers: :mod:`timers`.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from ipsecstack.entropy import Rng
from ipsecstack.ike import events, sk, timers
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.children import ChildSa, by_spi
from ipsecstack.ike.const import Exchange, Notify, Protocol
from ipsecstack.ike.events import (
    ChildDown,
    ChildFailed,
    ChildUp,
    IkeDown,
    IkeReauthed,
    IkeRekeyed,
    IkeUp,
    OutboundReady,
    PeerMoved,
    ReauthDue,
    ReauthFailed,
)
from ipsecstack.ike.exchanges import Exchanges
from ipsecstack.ike.groups import KeyPairSource
from ipsecstack.ike.keymat import IkeKeys
from ipsecstack.ike.model import (
    ChildConfig,
    Datagram,
    PeerConfig,
    id_text,
    identity,
    is_wildcard,
    same_identity,
)
from ipsecstack.ike.pools import Lease
from ipsecstack.ike.state import IkeState, Step, advance
from ipsecstack.ike.tasks import schedule
from ipsecstack.ike.tasks.base import Context
from ipsecstack.ike.tasks.child_create import ChildCreate
from ipsecstack.ike.tasks.child_delete import ChildDelete
from ipsecstack.ike.tasks.ike_delete import IkeDelete
from ipsecstack.ike.tasks.ike_init import IkeInit


class IkeSa:
    def __init__(self, cfg: PeerConfig, *, initiator: bool, rng: Rng, now: float, remote: str | None = None,
                 remote_port: int | None = None, wallclock: Callable[[], float] | None = None,
                 keypairs: KeyPairSource | None = None) -> None:  # fmt: skip
        self.tasks = Exchanges(self, cfg)  # the active task, the queue, the Message-ID window
        self.cfg = cfg
        # responder: the connections IKE_SA_INIT left possible; IKE_AUTH may switch ``cfg`` to one of them (profiles)
        self.candidates: list[PeerConfig] = [cfg]
        self.switched_from: str | None = None  # the connection IKE_SA_INIT answered with, if IKE_AUTH switched
        # who we authenticate as: local.id, or (responder) the IDr the peer asked for when it is in our certificate
        self.local_identity: tuple[int, bytes] = cfg.local_id
        self.wallclock = wallclock
        self.peer_cert: x509.Certificate | None = None
        self.send_initial_contact = True  # §2.4: only when we hold no other IKE SA with this peer (the manager knows)
        self.initial_contact = False  # responder: the peer's IKE_AUTH carried INITIAL_CONTACT (§2.4)
        self.peer_auth = ""  # how the peer proved itself: "psk" or the signature scheme, for logs and listings
        self.peer_hashes: frozenset[int] | None = None  # RFC 7427 §4: None until the peer announces them
        self.initiator = initiator
        self.rng = rng
        self.keypairs = keypairs
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
        self.ni = self.nr = b""
        self.init_request = self.init_response = b""  # the IKE_SA_INIT messages, for the AUTH payloads (§2.15)
        self.nat = False  # ESP goes in UDP (RFC 3948): a NAT was detected, or encapsulation is forced
        self.behind_nat = False  # NAT detection: our address is translated (we send the keepalives)
        self.peer_behind_nat = False  # NAT detection: the peer's address is translated (or it fakes it)
        self.nat_fake = False  # we faked our source hash to force encapsulation (``encap = true``)
        self.peer_id: tuple[int, bytes] | None = None
        self.virtual_ip: str | None = None  # what the peer assigned us (client side)
        self.lease: Lease | None = None  # the address we leased to the peer
        self.stats: dict[str, int] = {}
        self.failure = ""  # the latest refusal, for the manager's failure list
        self.children: list[ChildSa] = []
        self.rekeys_done: dict[int, list[tuple[bytes, bytes, ChildSa, bool]]] = {}  # §2.8.1 (tasks/child_rekey.py)
        self._events: list[Event] = []
        self.on_output: Callable[[IkeSa], None] | None = None  # told when there is output (the manager's ready set)
        # IKE SA rekeying (tasks/ike_rekey.py, §2.8.2): the SA that replaced this one; the new IKE SA of the peer's
        # rekey that came while ours was outstanding; whether this SA was made by a rekey and has not taken over;
        # new IKE SAs for the manager (spawned())
        self._successor: IkeSa | None = None
        self.peer_rekey: Context | None = None
        self.standby = False
        self._spawned: list[IkeSa] = []
        self.delete_cause = "local"  # the IkeDown cause once our DELETE is done (delete())
        self.last_heard = now
        self.up_at: float | None = None  # when it was established (or took over by rekeying)
        self.rekey_at: float | None = None
        self.expire_at: float | None = None  # hard lifetime: rekey_time + over_time after up_at
        self.reauth_at: float | None = None  # when reauth_time is due (ReauthDue; the manager does the rest)
        self.reauth_tries = 0
        self.linger_until: float | None = None  # deleting: when to stop waiting for the peer's DELETE

    @property
    def cfg(self) -> PeerConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: PeerConfig) -> None:
        self._cfg = cfg
        self.tasks.window.retry = cfg  # IKE_AUTH may switch the connection (profiles): its retransmission settings

    def __repr__(self) -> str:
        return f"<IkeSa {self.cfg.name} {self.spi_i.hex()}_{self.spi_r.hex()} {self.state}>"

    # --- outputs ------------------------------------------------------------------------------

    def datagrams(self) -> list[Datagram]:
        out, self.tasks.out = self.tasks.out, []
        return out

    def wake(self) -> None:
        """There is output to collect: tell whoever collects it (IkeManager), if anyone."""
        if self.on_output is not None:
            self.on_output(self)

    def _report(self, ev: Event) -> None:
        self._events.append(ev)
        self.wake()

    def events(self) -> list[Event]:
        evs, self._events = self._events, []
        return evs

    def spawned(self) -> list[IkeSa]:
        """The IKE SAs our rekeys made since the last call (demultiplexed to at once, RFC 7296 §2.8.2)."""
        out, self._spawned = self._spawned, []
        return out

    @property
    def successor(self) -> IkeSa | None:
        """The IKE SA that replaced this one by a rekey (§2.18), once it took over."""
        return self._successor

    def replaced_by(self, new: Context) -> None:
        assert isinstance(new, IkeSa)
        self._successor = new

    @property
    def established(self) -> bool:
        return self.state is IkeState.ESTABLISHED

    @property
    def idle(self) -> bool:
        """No request of ours outstanding or queued (the window is free)."""
        return self.tasks.idle

    def step(self, step: Step) -> None:
        """The one way the state changes (ike/state.py's table; anything else is a bug: IllegalTransition)."""
        self.state = advance(self.state, step)

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # --- the initiator's first exchange, and the responder's ------------------------------------

    def start(self, now: float, *, cookie: bytes = b"") -> None:
        """Initiator: send IKE_SA_INIT (with ``cookie`` in it: the tests' hook for a forged COOKIE)."""
        assert self.initiator and self.state == "new"
        self.spi_i = self.rng(8)
        self.tasks.run(IkeInit(self, cookie=cookie), now)

    def respond_init(self, msg: m.Message, now: float) -> bool:
        """Responder: answer an IKE_SA_INIT request. Returns False if no state should be kept."""
        return self.tasks.respond_init(msg, now)

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        """A datagram for this SA (non-ESP marker already removed)."""
        self.tasks.receive(data, src, src_port, dst_port, now)

    # --- what the tasks report ------------------------------------------------------------------

    def report_peer_moved(self, addr: str, port: int) -> None:
        self._report(PeerMoved(self, addr, port))

    def child_up(self, rec: ChildSa) -> None:
        self.children.append(rec)
        self._report(ChildUp.of(self, rec))

    def child_gone(self, rec: ChildSa, cause: str = "local") -> None:
        self.rekeys_done.pop(rec.spi_in, None)
        for new in self.children:
            if new.replaces == rec.spi_in and new.hold_out:
                self.release_out(new, "peer deleted the old SA")  # so the new one is ready before the old goes
        if rec in self.children:
            self.children.remove(rec)
            if any(o.child.name == rec.child.name for o in self.children):
                cause = "rekeyed"  # retired after a rekey (or a collision): its config still has an SA
            self._report(ChildDown(self, rec.spi_in, rec.spi_out, rec.child, cause))

    def child_failed(self, reason: str, counter: str = "child_failed") -> None:
        self.count(counter)
        self.failure = reason
        self._report(ChildFailed(self, reason))

    def release_out(self, rec: ChildSa, why: str) -> None:
        """§2.8: the held-back outbound SA of ``rec`` carries the traffic from now on."""
        rec.out_held_until = None
        self._report(OutboundReady(self, rec.spi_in, why))

    def inbound_seen(self, spi_in: int, now: float) -> None:
        """The datapath saw traffic on the child SA with this inbound SPI: the peer is alive (§2.4), and it
        uses the new pair of a rekey we answered (§2.8)."""
        self.heard(now)
        rec = next((c for c in self.children if c.spi_in == spi_in), None)
        if rec is not None and rec.hold_out:
            self.release_out(rec, "peer sends on it")

    def report_rekeyed(self, new: Context, collision: bool, redundant: Context | None) -> None:
        assert isinstance(new, IkeSa) and (redundant is None or isinstance(redundant, IkeSa))
        self._report(IkeRekeyed(self, new, collision, redundant))

    def close(self, reason: str, cause: str | None = None) -> None:
        """Forget the IKE SA and its children; ``cause`` (IkeDown) defaults to "local", "failed" if never up."""
        if self.state == "closed":
            return
        if cause is None:
            cause = "local" if self.up_at is not None else "failed"
            if self.state == "deleting":
                cause = self.delete_cause  # our DELETE went unanswered: still why we deleted it
        if self.lease is not None and self.successor is None:
            self.lease.release()  # the address goes back to the pool
            self.lease = None
        self.step(Step.CLOSE)
        self.tasks.window.outstanding = None
        self.linger_until = None
        for c in self.children:
            self._report(ChildDown(self, c.spi_in, c.spi_out, c.child, "ike"))
        self.children.clear()
        self._report(IkeDown(self, reason, cause))
        standby, self.peer_rekey = self.peer_rekey, None
        if standby is not None:  # the peer's rekey of this SA never took over: it goes with it, quietly
            standby.close("its IKE SA closed before a simultaneous rekey was resolved (RFC 7296 §2.8.2)", "rekeyed")

    # --- rekeying, NAT ----------------------------------------------------------------------------

    def sibling(self, *, initiator: bool, now: float) -> IkeSa:
        """A new IKE SA of the same connection and peer, for the manager once it exists (``spawned()``): a
        rekey's (tasks/ike_rekey.py gives it what it inherits, §2.18)."""
        new = IkeSa(self.cfg, initiator=initiator, rng=self.rng, now=now, wallclock=self.wallclock, remote=self.remote,
                    remote_port=self.remote_port, keypairs=self.keypairs)  # fmt: skip
        self._spawned.append(new)
        return new

    # --- the clock ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        out = self.tasks.window.outstanding
        return timers.next_time(self, out.due if out is not None else None)

    def heard(self, now: float) -> None:
        """The peer is alive (an authenticated message, or inbound ESP the runtime saw)."""
        self.last_heard = max(self.last_heard, now)

    def handle_timer(self, now: float) -> None:
        out = self.tasks.window.outstanding
        if timers.ended(self, now, window_free=out is None):
            return
        if self.established and self.reauth_at is not None and self.reauth_at <= now:
            self.reauth_at = None  # the manager builds the new IKE SA; it needs no exchange in this one
            self.count("reauths_due")
            self._report(ReauthDue(self))
        for rec in timers.holds_due(self, now):
            self.release_out(rec, "no traffic from the peer yet")
        if self.established and out is None and (task := timers.due_task(self, now)) is not None:
            self.tasks.run(task, now)
            return
        self.tasks.retransmit(now)

    def set_established(self, now: float) -> None:
        self.step(Step.AUTHENTICATED)
        schedule.established(self, now)
        self._report(IkeUp(self))

    def exchange_span(self) -> float:
        """How long a request of the peer's may take to arrive: our whole retransmission schedule for one."""
        return self.tasks.window.span()

    def rekey_now(self, now: float, spi: int | None = None) -> bool:
        """Rekey the child SA with this SPI (either direction: a volume lifetime, say), or with None the IKE SA,
        as soon as the window allows. False if there is no such child or the IKE SA is not established."""
        c = None if spi is None else by_spi(self.children, spi)
        if (spi is not None and c is None) or self.state != "established":
            return False
        if c is None:
            self.rekey_at = now
        else:
            c.rekey_at = now
        return True

    # --- what the caller asks for -----------------------------------------------------------------

    def create_child(self, name: str, now: float) -> bool:
        """Negotiate the configured child ``name`` again over CREATE_CHILD_SA (§1.3.1), unless an SA of it
        is up or being negotiated. False if there is no such child or the IKE SA is not established."""
        child: ChildConfig | None = next((c for c in self.cfg.children if c.name == name), None)
        if child is None or self.state != "established":
            return False
        busy = any(c.child.name == name for c in self.children) or self.tasks.busy_with(child)
        if not busy:
            self.tasks.queue(ChildCreate(self, child))
            self.tasks.next_queued(now)
        return True

    def child_expired(self, spi: int, now: float) -> bool:
        """A child SA hit its hard lifetime in the datapath: tell the peer and forget it (§1.4.1)."""
        c = by_spi(self.children, spi)
        if c is None:
            return False
        if self.state == "established":
            self.tasks.perform(ChildDelete(self, c), now)
        else:
            self.child_gone(c)
        return True

    def delete(self, now: float, cause: str = "local") -> None:
        """Start deleting the IKE SA (its children go with it, §1.4.1); ``cause`` is for its IkeDown."""
        if self.state != "established":
            self.close("deleted before establishment")
            return
        self.step(Step.DELETE)
        self.delete_cause = cause
        self.tasks.run(IkeDelete(self), now)

    def close_now(self, reason: str, now: float, cause: str = "local") -> None:
        """Send one DELETE for the IKE SA without waiting for (or retransmitting) it, and close at once:
        for an SA past its hard lifetime or replaced by the uniqueness policy, whose peer may be gone."""
        if self.state in ("established", "deleting") and self.tx is not None:
            self.tasks.send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)
        self.close(reason, cause)

    def refuse_auth(self, reason: str) -> bool:
        """Responder, right after an IKE_AUTH request authenticated the peer and before its output was
        collected: answer AUTHENTICATION_FAILED instead and close (uniqueness policy ``keep``, as strongSwan).
        The IKE_AUTH response, IkeUp and ChildUp are withdrawn. False when it is too late for that."""
        if self.initiator or self.state != "established" or not any(isinstance(e, IkeUp) for e in self._events):
            return False
        if not self.tasks.answer_again(Exchange.IKE_AUTH, [m.Notify(Notify.AUTHENTICATION_FAILED)]):
            return False
        self._events = [e for e in self._events if not isinstance(e, IkeUp | ChildUp)]
        self.children.clear()
        self.count("refused_by_uniqueness")
        self.close(reason, "failed")
        return True

    @property
    def peer_virtual_ip(self) -> str | None:
        """The address we leased to the peer from a pool (§3.15), if any."""
        return None if self.lease is None else self.lease.address


__all__ = [  # the IKE SA's public surface: the configuration (model.py) and the events (events.py) too
    "ChildConfig", "ChildDown", "ChildFailed", "ChildSa", "ChildUp", "Datagram", "Event", "IkeDown", "IkeReauthed",
    "IkeRekeyed", "IkeSa", "IkeUp", "OutboundReady", "PeerConfig", "PeerMoved", "ReauthDue", "ReauthFailed",
    "id_text", "identity", "is_wildcard", "same_identity",
]  # fmt: skip

Event = events.Event[IkeSa]  # what an IkeSa (and the manager) reports
