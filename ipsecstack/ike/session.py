"""One IKE SA as a sans-IO state machine (RFC 7296): IKE_SA_INIT, IKE_AUTH (PSK or certificates), the rest.

Theory of operation
-------------------
An :class:`IkeSa` never touches a socket or a clock. ``receive(data, src, src_port, dst_port, now)``
feeds it a datagram addressed to it (the manager demultiplexes by SPI), ``handle_timer(now)`` lets
it retransmit or give up, and the caller collects what it produced with ``datagrams()`` and
``events()``; ``get_timer()`` says when it next needs the clock. Randomness (SPIs, nonces, DH
private values, CBC IVs) comes from the injected ``rng``.

States: initiator ``init_sent`` -> ``auth_sent`` -> ``established``; responder ``init_done`` ->
``established``; either -> ``deleting`` -> ``closed``. A message that does not fit the state is
dropped and counted (§2.21); nothing is answered before it authenticates, except the unprotected
IKE_SA_INIT error notifies §2.21.1 allows.

Message IDs (§2.2): one outstanding request per direction (window 1). Our request is retransmitted
with exponential back-off until a response with the same Message ID arrives or the tries run out
(§2.4: then the IKE SA is declared dead). A retransmitted peer request (Message ID one below the
next expected) gets the cached response again, byte for byte, and is not processed twice.

Authentication (§2.15) is in :mod:`ipsecstack.ike.auth` (proofs) and :mod:`ipsecstack.ike.certs`
(certificate paths): IKE_SA_INIT carries SIGNATURE_HASH_ALGORITHMS (RFC 7427) both ways and the
responder's CERTREQ; IKE_AUTH carries CERT, CERTREQ and AUTH. Certificate validity needs the time of
day, which comes from the injected ``wallclock``.

NAT traversal (§2.23): both sides send NAT_DETECTION_*_IP in IKE_SA_INIT; if either hash differs
the SA moves to port 4500 for everything after IKE_SA_INIT and the child SAs are UDP-encapsulated.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509

from ipsecstack.entropy import Rng
from ipsecstack.ike import auth, sk
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.certs import DnError, cert_has_id, dn_from_text, dn_text, same_dn, subject, verify_path
from ipsecstack.ike.const import AuthMethod, Exchange, Flag, IdType, Notify, Protocol
from ipsecstack.ike.groups import Group, KeyExchangeError
from ipsecstack.ike.keymat import IkeKeys, child_keymat, ike_sa_keys
from ipsecstack.ike.pools import Pool
from ipsecstack.ike.ts import Range, narrow

# RFC 7296 §3.15: configuration payload types and attributes
CFG_REQUEST = 1
CFG_REPLY = 2
CP_INTERNAL_IP4_ADDRESS = 1
CP_INTERNAL_IP4_DNS = 3
CP_INTERNAL_IP6_ADDRESS = 8
CP_INTERNAL_IP6_DNS = 10
NAT_T_PORT = 4500
# RFC 4302 §3.3.3: AH's ICV covers the outer IP addresses, which a NAT rewrites (RFC 3948 carries ESP only)
AH_NAT = "AH cannot cross a NAT (RFC 4302 authenticates the outer IP header; RFC 3948 encapsulates ESP only)"


@dataclass
class ChildConfig:
    name: str
    local_ts: list[Range]
    remote_ts: list[Range]
    proposals: list[props.Algorithms]
    mode: str = "tunnel"
    rekey_time: float | None = 3600.0  # seconds until the initiator of the child SA rekeys it
    replay_window: int = 64  # anti-replay window of the inbound SA (RFC 4303 §3.4.3)
    life_time: float | None = None  # hard limit of the SAs (the datapath drops them then)
    rekey_bytes: int | None = None  # rekey after this much traffic (soft limit of the SAs)
    rekey_packets: int | None = None
    close_action: str = "none"  # the peer closed it (or its IKE SA): "none", "trap" or "start"
    dpd_action: str = "clear"  # its IKE SA's peer is dead (§2.4): "clear", "trap" or "restart"
    updown: tuple[str, ...] = ()  # script and arguments run when it comes up and goes down (runtime/updown.py)

    @property
    def ike_protocol(self) -> int:
        """The IPsec protocol of its proposals (RFC 7296 §3.3.1 Protocol ID): ESP, or AH (ah_proposals)."""
        return Protocol.AH if self.proposals and self.proposals[0].protocol == Protocol.AH else Protocol.ESP

    @property
    def protocol(self) -> Literal["esp", "ah"]:
        return "ah" if self.ike_protocol == Protocol.AH else "esp"


@dataclass
class PeerConfig:
    """What an IKE SA needs to know about its peer (built from ``[connections.<name>]``)."""

    name: str
    local_addr: str
    remote_addr: str | None
    proposals: list[props.Algorithms]
    local_id: tuple[int, bytes]
    remote_id: tuple[int, bytes] | None
    psk: bytes = field(repr=False)
    children: list[ChildConfig] = field(default_factory=list)
    creds: auth.Credentials = field(default_factory=auth.Credentials)  # how each side authenticates
    local_port: int = 500
    remote_port: int = 500
    retransmit_timeout: float = 2.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    half_open_timeout: float = 30.0
    encap: bool = False  # force UDP encapsulation: announce a NAT (as strongSwan's encap = yes does)
    pools: list[Pool] = field(default_factory=list)  # virtual IPs for remote-access clients (§3.15)
    request_vip: bool = False  # as a client: ask the peer for a virtual IPv4 address
    dpd_delay: float | None = None  # liveness check after this much silence (§2.4)
    rekey_time: float | None = 14400.0  # IKE SA rekeying (CREATE_CHILD_SA, §1.3.2)
    rekey_jitter: float = 0.1  # rekey up to this fraction early, so both ends do not rekey at once
    over_time: float | None = None  # hard lifetime = rekey_time + this (None: 10% of rekey_time, as strongSwan)
    reauth_time: float | None = None  # make-before-break reauthentication: a new IKE SA this long after (§2.8.3)
    unique: str = "no"  # responder: IKE SAs of the same peer identity ("no", "never", "replace", "keep"; manager)


@dataclass
class Datagram:
    data: bytes
    dst: str
    dst_port: int
    src_port: int  # 4500: the caller prepends the non-ESP marker (RFC 3948 §2.2)


@dataclass
class IkeUp:
    sa: IkeSa


@dataclass
class PeerMoved:
    """The peer's NAT mapping changed: its IKE (and ESP-in-UDP) now come from ``addr``:``port``."""

    sa: IkeSa
    addr: str
    port: int


@dataclass
class IkeRekeyed:
    old: IkeSa
    new: IkeSa


@dataclass
class ReauthDue:
    """``reauth_time`` has come for this IKE SA: the manager starts a new IKE SA with the same peer and
    children (fresh IKE_SA_INIT and IKE_AUTH, RFC 7296 §2.8.3) and retires this one once it is up."""

    sa: IkeSa


@dataclass
class IkeReauthed:
    """Reauthentication done (make-before-break): ``new`` and its child SAs are up, ``old`` is being deleted."""

    old: IkeSa
    new: IkeSa


@dataclass
class ChildFailed:
    """A child SA could not be negotiated (either role) or rekeyed; ``reason`` names both sides' offers."""

    sa: IkeSa
    reason: str


@dataclass
class ReauthFailed:
    """The new IKE SA of a reauthentication failed; ``sa`` stays and tries again at ``retry_at`` (None: no more
    tries; it stays until it expires or is deleted)."""

    sa: IkeSa
    reason: str
    retry_at: float | None


@dataclass
class IkeDown:
    """The IKE SA is gone. ``cause`` says who ended it, for the runtime's close/DPD actions: ``"peer"`` (it
    sent a DELETE, §1.4.1), ``"dead"`` (no answer while established: DPD or any other request, §2.4),
    ``"failed"`` (never established), ``"expired"`` (not rekeyed within its hard lifetime, over_time),
    ``"rekeyed"`` (replaced by its successor, §2.18), ``"reauth"`` (replaced by a newer IKE SA with the same
    peer: our reauthentication, or the peer deleted it while its newer one stays; the manager decides) or
    ``"local"`` (we deleted it)."""

    sa: IkeSa
    reason: str
    cause: str = "local"


@dataclass
class ChildUp:
    sa: IkeSa
    child: ChildConfig
    mode: str
    transform: str
    esn: bool
    spi_in: int
    spi_out: int
    key_in: bytes = field(repr=False)
    key_out: bytes = field(repr=False)
    local_ts: list[Range]
    remote_ts: list[Range]
    encap: tuple[int, int] | None
    replaces: int | None = None  # inbound SPI of the child SA this one rekeys (make-before-break)
    rekey_at: float | None = None
    protocol: Literal["esp", "ah"] = "esp"  # the child's IPsec protocol (ah_proposals: AH, RFC 4302)


@dataclass
class ChildDown:
    """A child SA is gone. ``cause``: ``"peer"`` (the peer deleted it and no other SA of its config remains
    in this IKE SA), ``"rekeyed"`` (a newer SA of the same config carries on), ``"ike"`` (its IKE SA went: see
    that IkeDown) or ``"local"`` (we deleted it)."""

    sa: IkeSa
    spi_in: int
    spi_out: int
    child: ChildConfig | None = None
    cause: str = "local"


Event = (
    IkeUp
    | IkeRekeyed
    | PeerMoved
    | IkeDown
    | ChildUp
    | ChildDown
    | ChildFailed
    | ReauthDue
    | IkeReauthed
    | ReauthFailed
)

REAUTH_RETRY_DELAY = 30.0  # a failed reauthentication is tried again this much later ...
REAUTH_TRIES = 5  # ... this many times in all; then the IKE SA stays until it expires (over_time) or is deleted


def identity(text: str) -> tuple[int, bytes]:
    """An IKE identity from strongSwan-style text: an IP address, an FQDN, user@fqdn, keyid:..., or a DN.

    A DN is written as strongSwan does (``C=CH, O=example, CN=gw.example``); a bad one raises ValueError.
    """
    if text.startswith("keyid:"):
        return IdType.ID_KEY_ID, text[6:].encode()
    if "=" in text:
        try:
            return IdType.ID_DER_ASN1_DN, dn_from_text(text)
        except DnError as e:
            raise ValueError(f"not a distinguished name: {e}") from None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return (IdType.ID_IPV4_ADDR if addr.version == 4 else IdType.ID_IPV6_ADDR), addr.packed
    if "@" in text:
        return IdType.ID_RFC822_ADDR, text.encode()
    return IdType.ID_FQDN, text.encode()


def id_text(id_type: int, data: bytes) -> str:
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        try:
            return str(ipaddress.ip_address(data))
        except ValueError:
            return data.hex()
    if id_type == IdType.ID_KEY_ID:
        return "keyid:" + data.decode(errors="replace")
    if id_type == IdType.ID_DER_ASN1_DN:
        return dn_text(data)
    return data.decode(errors="replace")


def nat_hash(spi_i: bytes, spi_r: bytes, addr: str, port: int) -> bytes:
    """RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port)."""
    return hashlib.sha1(spi_i + spi_r + ipaddress.ip_address(addr).packed + port.to_bytes(2, "big")).digest()


class IkeSa:
    def __init__(self, cfg: PeerConfig, *, initiator: bool, rng: Rng, now: float, remote: str | None = None,
                 remote_port: int | None = None, wallclock: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.wallclock = wallclock  # seconds since the epoch, for certificate validity (certs only)
        self.peer_cert: x509.Certificate | None = None
        self.send_initial_contact = True  # §2.4: only when we hold no other IKE SA with this peer (the manager knows)
        self.peer_auth = ""  # how the peer proved itself: "psk" or the signature scheme, for logs and listings
        self._peer_hashes: frozenset[int] | None = None  # RFC 7427 §4: None until the peer announces them
        self.initiator = initiator
        self.rng = rng
        self.created = now
        self.remote = remote or cfg.remote_addr or ""
        self.remote_port = remote_port or cfg.remote_port
        self.local_port = cfg.local_port
        self.state = "new"
        self.spi_i = b""
        self.spi_r = bytes(8)
        self.chosen: props.Chosen | None = None
        self.keys: IkeKeys | None = None
        self.tx: sk.SkKeys | None = None
        self.rx: sk.SkKeys | None = None
        self.nat = False
        self.behind_nat = False
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
        self._pending: tuple[str, Any] | None = None  # what our outstanding request is doing
        self.rekey_at: float | None = None
        self.reauth_at: float | None = None  # when reauth_time is due (ReauthDue; the manager does the rest)
        self._reauth_tries = 0
        self._delete_cause = "local"  # the IkeDown cause once our DELETE is done (delete())
        self.successor: IkeSa | None = None  # set once this IKE SA was rekeyed
        self._lease: tuple[Pool, bytes] | None = None
        self.virtual_ip: str | None = None  # what the peer assigned us (client side)
        self._queue: list[Callable[[float], None]] = []  # requests waiting for the window (§2.3)
        self._rekeys_done: dict[int, list[tuple[bytes, bytes, ChildUp, bool]]] = {}
        self.up_at: float | None = None  # when it was established (or took over by rekeying)
        self.expire_at: float | None = None  # hard lifetime: rekey_time + over_time after up_at
        self.initial_contact = False  # responder: the peer's IKE_AUTH carried INITIAL_CONTACT (§2.4)

    def __repr__(self) -> str:
        return f"<IkeSa {self.cfg.name} {self.spi_i.hex()}_{self.spi_r.hex()} {self.state}>"

    # --- the caller's side ---------------------------------------------------------------------

    def datagrams(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def get_timer(self) -> float | None:
        if self.state == "closed":
            return None
        if self._outstanding is not None:
            if self.state == "established" and self.expire_at is not None:
                return min(self._outstanding[3], self.expire_at)
            return self._outstanding[3]
        if self.state == "init_done":
            return self.created + self.cfg.half_open_timeout
        if self.state != "established":
            return None
        times = [c.rekey_at for c in self.children if c.rekey_at is not None]
        if self.rekey_at is not None:
            times.append(self.rekey_at)
        if self.reauth_at is not None:
            times.append(self.reauth_at)
        if self.cfg.dpd_delay:
            times.append(self.last_heard + self.cfg.dpd_delay)
        if self.expire_at is not None:
            times.append(self.expire_at)
        return min(times) if times else None

    def heard(self, now: float) -> None:
        """The peer is alive (an authenticated message, or inbound ESP the runtime saw)."""
        self.last_heard = max(self.last_heard, now)

    def handle_timer(self, now: float) -> None:
        if self.state == "init_done" and now >= self.created + self.cfg.half_open_timeout:
            self._close("half-open IKE SA timed out (no IKE_AUTH)")
            return
        if self.state == "established" and self.expire_at is not None and now >= self.expire_at:
            over = self.expire_at - (self.up_at or 0.0) - (self.cfg.rekey_time or 0.0)
            self.close_now(f"not rekeyed within its hard lifetime (rekey_time + over_time = "
                           f"{self.cfg.rekey_time:g}s + {over:g}s)", now, "expired")  # fmt: skip
            return
        if self.state == "established" and self.reauth_at is not None and self.reauth_at <= now:
            self.reauth_at = None  # the manager builds the new IKE SA; it needs no exchange in this one
            self._count("reauths_due")
            self._events.append(ReauthDue(self))
        if self.state == "established" and self._outstanding is None:
            if self.rekey_at is not None and self.rekey_at <= now:
                self._rekey_ike(now)
                return
            due = next((c for c in self.children if c.rekey_at is not None and c.rekey_at <= now), None)
            if due is not None:
                self._rekey_child(due, now)
                return
            if self.cfg.dpd_delay and now >= self.last_heard + self.cfg.dpd_delay:
                self._count("dpd_checks")
                self._pending = ("dpd", None)
                self._send_request(Exchange.INFORMATIONAL, [], now)
                return
        if self._outstanding is None or now < self._outstanding[3]:
            return
        mid, data, tries, _ = self._outstanding
        if tries >= self.cfg.retransmit_tries:
            dpd = self._pending is not None and self._pending[0] == "dpd"
            # §2.4: no answer on an established IKE SA means the peer is dead (the DPD action applies)
            cause = "dead" if self.state == "established" else None
            self._close(("dead peer: no answer to liveness checks" if dpd else "peer did not answer")
                        + f" after {tries + 1} transmissions", cause)  # fmt: skip
            return
        self._count("retransmissions")
        delay = self.cfg.retransmit_timeout * self.cfg.retransmit_base ** (tries + 1)
        self._outstanding = (mid, data, tries + 1, now + delay)
        self._emit(data)

    @property
    def established(self) -> bool:
        return self.state == "established"

    # --- initiator ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Initiator: send IKE_SA_INIT."""
        assert self.initiator and self.state == "new"
        self.spi_i = self.rng(8)
        self._group = self.cfg.proposals[0].dh[0]
        self._send_init(now)

    def _send_init(self, now: float, fresh: bool = True) -> None:
        """Send IKE_SA_INIT; ``fresh=False`` (a COOKIE retry) keeps KE and nonce unchanged (§2.6)."""
        assert self._group is not None
        if fresh:
            self._dh, self._pub = self._group.generate(self.rng)
            self._ni = self.rng(32)
        pub = self._pub
        payloads: list[m.AnyPayload] = []
        if self._cookie:
            payloads.append(m.Notify(Notify.COOKIE, self._cookie))
        sa = m.SA([p.to_payload(i + 1, b"") for i, p in enumerate(self.cfg.proposals)])
        payloads += [sa, m.KE(self._group.number, pub), m.Nonce(self._ni), *self._nat_notifies(), auth.hash_notify()]
        msg = m.Message(self.spi_i, bytes(8), Exchange.IKE_SA_INIT, Flag.INITIATOR, 0, payloads)
        self._init_request = msg.encode()
        self.state = "init_sent"
        self._next_mid = 1
        self._request(0, self._init_request, now)

    def _nat_notifies(self) -> list[m.AnyPayload]:
        local = self.cfg.local_addr
        if self.cfg.encap:
            # RFC 7296 §2.23 allows faking the source hash to force UDP encapsulation
            self.nat = True
            src_hash = self.rng(20)
        else:
            src_hash = nat_hash(self.spi_i, self.spi_r, local, self.local_port)
        return [
            m.Notify(Notify.NAT_DETECTION_SOURCE_IP, src_hash),
            m.Notify(
                Notify.NAT_DETECTION_DESTINATION_IP, nat_hash(self.spi_i, self.spi_r, self.remote, self.remote_port)
            ),
        ]

    def _on_init_response(self, msg: m.Message, now: float) -> None:
        for n in msg.notifies():
            if n.notify_type == Notify.COOKIE and not self._cookie:
                self._cookie = n.data
                self._outstanding = None
                self._count("cookies_received")
                self._send_init(now, fresh=False)
                return
            if n.notify_type == Notify.INVALID_KE_PAYLOAD and len(n.data) == 2 and self._ke_retries < 2:
                want = int.from_bytes(n.data, "big")
                group = next((g for p in self.cfg.proposals for g in p.dh if g.number == want), None)
                if group is None:
                    self._close(f"peer wants key exchange group {want}, which we do not propose")
                    return
                self._ke_retries += 1
                self._group = group
                self._outstanding = None
                self._send_init(now)
                return
            if n.notify_type < 16384:
                self._close(f"peer refused IKE_SA_INIT: {_notify_name(n.notify_type)}")
                return
        sas = msg.get(m.SA)
        kes = msg.get(m.KE)
        nonces = msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1 or len(sas[0].proposals) != 1:  # type: ignore[union-attr]
            self._drop("init_response_incomplete")
            return
        chosen = props.check_choice(self.cfg.proposals, sas[0].proposals[0], Protocol.IKE)  # type: ignore[union-attr]
        ke = kes[0]
        assert isinstance(ke, m.KE)
        if chosen is None or chosen.dh is None or chosen.dh.number != ke.group or ke.group != self._group.number:  # type: ignore[union-attr]
            self._close("peer chose a proposal we did not offer")
            return
        self.spi_r = msg.spi_r
        self._nr = nonces[0].data  # type: ignore[union-attr]
        self._init_response = msg.raw
        self._peer_hashes = _hashes(msg)
        if not self._derive(chosen, ke.data):
            return
        self._detect_nat(msg)
        self._send_auth(now)

    def _send_auth(self, now: float) -> None:
        child = self.cfg.children[0] if self.cfg.children else None
        idi = m.Identification(*self.cfg.local_id, initiator=True)
        proof = self._prove(idi)
        inner: list[m.AnyPayload] = [idi, *proof[:-1], *self.cfg.creds.certreq()]
        if self.cfg.remote_id is not None:
            inner.append(m.Identification(*self.cfg.remote_id, initiator=False))
        inner.append(proof[-1])
        if self.cfg.request_vip:
            inner.append(m.CP(CFG_REQUEST, [(CP_INTERNAL_IP4_ADDRESS, b"")]))
        if child is not None:
            self._child = child
            self._child_spi = self._new_child_spi()
            spi = self._child_spi.to_bytes(4, "big")
            inner.append(m.SA([p.without_dh().to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
            inner.append(m.TS([r.to_payload() for r in child.local_ts], initiator=True))
            inner.append(m.TS([r.to_payload() for r in child.remote_ts], initiator=False))
            if child.mode == "transport":
                inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        if self.send_initial_contact:
            inner.append(m.Notify(Notify.INITIAL_CONTACT))
        self.state = "auth_sent"
        self._send_request(Exchange.IKE_AUTH, inner, now)

    def _on_auth_response(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        notes = [p for p in inner if isinstance(p, m.Notify)]
        for n in notes:
            if n.notify_type == Notify.AUTHENTICATION_FAILED:
                what = "PSK" if self.cfg.creds.local == "psk" else "certificate (is our CA in its cacerts?)"
                self._close(f"peer says AUTHENTICATION_FAILED: check the {what} and the identities on both sides")
                return
        idr = next((p for p in inner if isinstance(p, m.Identification) and not p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idr is None or proof is None:
            self._close("IKE_AUTH response without IDr/AUTH")
            return
        why = None
        if self.cfg.remote_id is not None and not same_identity((idr.id_type, idr.data), self.cfg.remote_id):
            why = f"identity mismatch: remote.id is {id_text(*self.cfg.remote_id)!r}"
        why = why or self._verify_peer(idr, proof, inner)
        if why is not None:
            self._count("auth_failed")
            # §2.21.2: the responder already considers the IKE SA up; tell it, once, in an INFORMATIONAL
            self._send_request(Exchange.INFORMATIONAL, [m.Notify(Notify.AUTHENTICATION_FAILED)], now)
            self._close(f"authentication of the responder {id_text(idr.id_type, idr.data)!r} failed: {why}")
            return
        self.peer_id = (idr.id_type, idr.data)
        reply = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REPLY), None)
        for attr, value in reply.attributes if reply is not None else []:
            if attr == CP_INTERNAL_IP4_ADDRESS and len(value) == 4:
                self.virtual_ip = str(ipaddress.ip_address(value))
        self._established(now)
        child = self._child
        if child is None:
            return
        errors = [n for n in notes if n.notify_type < 16384]
        sas = [p for p in inner if isinstance(p, m.SA)]
        if errors or len(sas) != 1 or len(sas[0].proposals) != 1:
            why = _notify_name(errors[0].notify_type) if errors else "no SA payload"
            if self.nat and child.protocol == "ah":
                why += f" ({AH_NAT})"
            self._child_failed(f"child SA {child.name} refused: {why}")
            return
        chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol, ignore_dh=True)
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if chosen is None or tsi is None or tsr is None or len(chosen.spi) != 4:
            self._child_failed(f"child SA {child.name}: malformed or unoffered reply")
            return
        if self.nat and child.protocol == "ah":
            # the peer accepted AH across the NAT anyway: it cannot work; ask it to drop its half
            self._child_failed(f"child SA {child.name} not installed: {AH_NAT}")
            spi = self._child_spi.to_bytes(4, "big")
            self._queue.append(functools.partial(self._send_delete, m.Delete(Protocol.AH, [spi])))
        else:
            transport = any(n.notify_type == Notify.USE_TRANSPORT_MODE for n in notes)
            local = [Range.from_payload(t) for t in tsi.selectors]
            remote = [Range.from_payload(t) for t in tsr.selectors]
            self._child_up(child, chosen, "transport" if transport else "tunnel", local, remote,
                           spi_in=self._child_spi, spi_out=int.from_bytes(chosen.spi, "big"), now=now)  # fmt: skip
        for extra in self.cfg.children[1:]:
            self._queue.append(functools.partial(self._create_child, extra))
        self._next_queued(now)

    # --- responder ---------------------------------------------------------------------------

    def respond_init(self, msg: m.Message, now: float) -> bool:
        """Responder: answer an IKE_SA_INIT request. Returns False if no state should be kept."""
        self.spi_i = msg.spi_i
        self._init_request = msg.raw
        sas, kes, nonces = msg.get(m.SA), msg.get(m.KE), msg.get(m.Nonce)
        if len(sas) != 1 or len(kes) != 1 or len(nonces) != 1:
            self._reply_plain(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return False
        chosen = props.select(self.cfg.proposals, sas[0].proposals, Protocol.IKE)  # type: ignore[union-attr]
        if chosen is None:
            self._count("no_proposal_chosen")
            self._reply_plain(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)  # type: ignore[union-attr]
            ours = ", ".join(p.text for p in self.cfg.proposals)
            self.failure = f"no IKE proposal in common: peer offered {theirs}; ours {ours}"
            return False
        ke = kes[0]
        assert isinstance(ke, m.KE) and chosen.dh is not None
        if ke.group != chosen.dh.number:
            self._reply_plain(msg, [m.Notify(Notify.INVALID_KE_PAYLOAD, chosen.dh.number.to_bytes(2, "big"))])
            return False
        self._ni = nonces[0].data  # type: ignore[union-attr]
        self._nr = self.rng(32)
        self.spi_r = self.rng(8)
        self._group = chosen.dh
        self._dh, pub = chosen.dh.generate(self.rng)
        if not self._derive(chosen, ke.data):
            return False
        self._detect_nat(msg)
        payloads: list[m.AnyPayload] = [m.SA([chosen.to_payload()]), m.KE(chosen.dh.number, pub), m.Nonce(self._nr)]
        payloads += [*self._nat_notifies(), auth.hash_notify(), *self.cfg.creds.certreq()]
        self._peer_hashes = _hashes(msg)
        resp = m.Message(self.spi_i, self.spi_r, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0, payloads)
        self._init_response = resp.encode()
        self._peer_mid = 1
        self._cached_response = (0, self._init_response)
        self._emit(self._init_response, port=self.local_port)
        self.state = "init_done"
        return True

    def _on_auth_request(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        idi = next((p for p in inner if isinstance(p, m.Identification) and p.initiator), None)
        proof = next((p for p in inner if isinstance(p, m.Auth)), None)
        if idi is None or proof is None:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            self._close("IKE_AUTH request without IDi/AUTH")
            return
        want = self.cfg.remote_id
        if want is not None and not same_identity((idi.id_type, idi.data), want):
            why: str | None = f"identity mismatch: remote.id is {id_text(*want)!r}"
        else:
            why = self._verify_peer(idi, proof, inner)
        if why is not None:
            self._count("auth_failed")
            self._respond(msg, [m.Notify(Notify.AUTHENTICATION_FAILED)])
            self._close(f"authentication of {id_text(idi.id_type, idi.data)!r} failed: {why}")
            return
        self.peer_id = (idi.id_type, idi.data)
        idr = m.Identification(*self.cfg.local_id, initiator=False)
        out: list[m.AnyPayload] = [idr, *self._prove(idr)]
        vip_ts: list[Range] | None = None
        request = next((p for p in inner if isinstance(p, m.CP) and p.cfg_type == CFG_REQUEST), None)
        if request is not None and self.cfg.pools:
            vip = self._lease_address(request)
            if vip is None:
                # §3.15.4: no address for this client: the IKE SA stands, no child SA
                out.append(m.Notify(Notify.INTERNAL_ADDRESS_FAILURE))
                self._respond(msg, out)
                self._established(now)
                return
            out.append(self._config_reply(vip))
            vip_ts = [Range(vip, vip)]
        child_result = self._negotiate_child(inner, remote_override=vip_ts)
        if isinstance(child_result, int):
            out.append(m.Notify(child_result))
            self._respond(msg, out)
            self._established(now)
            return
        child, chosen, mode, tsi, tsr = child_result
        spi_in = self._new_child_spi()
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, None, chosen.esn, chosen.number,
                             spi_in.to_bytes(4, "big"))  # fmt: skip
        out += [m.SA([reply.to_payload()]), m.TS([r.to_payload() for r in tsi], True),
                m.TS([r.to_payload() for r in tsr], False)]  # fmt: skip
        if mode == "transport":
            out.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        self._respond(msg, out)
        self._established(now)
        self._child_up(child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"), now=now)

    def _lease_address(self, request: m.CP) -> Any:
        """A virtual IP from the first pool of a family the client asked for (§3.15.1)."""
        wanted = {t for t, _ in request.attributes}
        assert self.peer_id is not None
        key = bytes([self.peer_id[0]]) + self.peer_id[1]
        for pool in self.cfg.pools:
            if (pool.first.version == 4 and CP_INTERNAL_IP4_ADDRESS in wanted) or (
                pool.first.version == 6 and CP_INTERNAL_IP6_ADDRESS in wanted
            ):
                addr = pool.acquire(key)
                if addr is not None:
                    self._lease = (pool, key)
                    self._count("addresses_leased")
                    return addr
        self._count("address_pool_exhausted")
        return None

    def _config_reply(self, vip: Any) -> m.CP:
        attrs: list[tuple[int, bytes]] = []
        if vip.version == 4:
            attrs.append((CP_INTERNAL_IP4_ADDRESS, vip.packed))
        else:
            attrs.append((CP_INTERNAL_IP6_ADDRESS, vip.packed + b"\x80"))  # address | prefix length 128
        pool = self._lease[0] if self._lease else None
        for dns in pool.dns if pool else []:
            attrs.append((CP_INTERNAL_IP4_DNS if dns.version == 4 else CP_INTERNAL_IP6_DNS, dns.packed))
        return m.CP(CFG_REPLY, attrs)

    def _negotiate_child(
        self, inner: list[m.AnyPayload], ignore_dh: bool = True, remote_override: list[Range] | None = None
    ) -> int | tuple[ChildConfig, props.Chosen, str, list[Range], list[Range]]:
        sas = [p for p in inner if isinstance(p, m.SA)]
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if len(sas) != 1 or tsi is None or tsr is None:
            self._child_failed("child SA request without SA/TSi/TSr payloads")
            return Notify.NO_PROPOSAL_CHOSEN
        transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
        offered_i = [Range.from_payload(t) for t in tsi.selectors]
        offered_r = [Range.from_payload(t) for t in tsr.selectors]
        any_proposal = False
        ah_refused = ""
        for child in self.cfg.children:
            chosen = props.select(child.proposals, sas[0].proposals, child.ike_protocol, ignore_dh=ignore_dh)
            if chosen is None or len(chosen.spi) != 4:
                continue
            if self.nat and child.protocol == "ah":
                self._count("ah_behind_nat")
                ah_refused = child.name
                continue
            any_proposal = True
            if (child.mode == "transport") != transport:
                continue
            ni = narrow(offered_i, remote_override if remote_override is not None else child.remote_ts)
            nr = narrow(offered_r, child.local_ts)
            if ni and nr:
                return child, chosen, child.mode, ni, nr
        theirs = ", ".join(props.describe_offer(p) for p in sas[0].proposals)
        if any_proposal:
            ts = f"TSi {', '.join(map(str, offered_i))} TSr {', '.join(map(str, offered_r))}"
            ours = "; ".join(f"{c.name}: {c.mode} {', '.join(map(str, c.remote_ts))} === "
                             f"{', '.join(map(str, c.local_ts))}" for c in self.cfg.children)  # fmt: skip
            self._child_failed(f"child SA refused (TS_UNACCEPTABLE): peer proposed {ts} "
                               f"({'transport' if transport else 'tunnel'} mode); ours {ours}")  # fmt: skip
            return Notify.TS_UNACCEPTABLE
        ours = "; ".join(f"{c.name}: {', '.join(p.text for p in c.proposals)}" for c in self.cfg.children)
        if ah_refused:
            self._child_failed(f"child SA {ah_refused} refused (NO_PROPOSAL_CHOSEN): {AH_NAT}")
        else:
            self._child_failed(f"child SA refused (NO_PROPOSAL_CHOSEN): peer offered {theirs}; ours {ours}")
        return Notify.NO_PROPOSAL_CHOSEN

    # --- shared ------------------------------------------------------------------------------

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        """A datagram for this SA (non-ESP marker already removed)."""
        try:
            msg = m.decode(data)
        except m.ParseError as e:
            self._drop(f"parse_{e.reason}")
            return
        msg.raw = data
        if msg.is_response:
            self._on_response(msg, now)
        else:
            self._on_request(msg, src, src_port, dst_port, now)

    def _on_response(self, msg: m.Message, now: float) -> None:
        out = self._outstanding
        if out is None or msg.message_id != out[0]:
            self._drop("unexpected_response")
            return
        if msg.exchange == Exchange.IKE_SA_INIT:
            if self.state != "init_sent":
                self._drop("unexpected_response")
                return
            self._outstanding = None
            self._on_init_response(msg, now)
            return
        if self.rx is None:
            self._drop("unexpected_response")  # an encrypted exchange before we have keys
            return
        inner = self._open(msg)
        if inner is None:
            return
        self._outstanding = None
        self.heard(now)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == "delete_old_ike":
            self._close("rekeyed", "rekeyed")
        elif msg.exchange == Exchange.IKE_AUTH and self.state == "auth_sent":
            self._on_auth_response(msg, inner, now)
        elif msg.exchange == Exchange.INFORMATIONAL and self.state == "deleting":
            self._close("reauthenticated" if self._delete_cause == "reauth" else "deleted")
        elif msg.exchange == Exchange.CREATE_CHILD_SA and pending is not None and pending[0] == "rekey_child":
            self._on_rekey_response(inner, pending[1], now)
        elif msg.exchange == Exchange.CREATE_CHILD_SA and pending is not None and pending[0] == "rekey_ike":
            self._on_ike_rekey_response(inner, pending[1], now)
        elif msg.exchange == Exchange.INFORMATIONAL and pending is not None and pending[0] == "delete_child":
            self._child_gone(pending[1])
        elif msg.exchange == Exchange.CREATE_CHILD_SA and pending is not None and pending[0] == "new_child":
            self._on_new_child_response(inner, pending[1], now)
        self._next_queued(now)

    def _next_queued(self, now: float) -> None:
        """Send the next deferred request once the window (one outstanding request) is free."""
        while self._queue and self._outstanding is None and self.state == "established":
            self._queue.pop(0)(now)

    def _on_request(self, msg: m.Message, src: str, src_port: int, dst_port: int, now: float) -> None:
        if msg.exchange == Exchange.IKE_SA_INIT:
            if self._cached_response and self._cached_response[0] == 0 and msg.raw == self._init_request:
                self._emit(self._cached_response[1])
            else:
                self._drop("unexpected_request")
            return
        if self.rx is None:
            self._drop("unexpected_request")
            return
        if self._cached_response is not None and msg.message_id == self._cached_response[0]:
            if self._open(msg) is not None:  # only an authentic retransmission gets the cached answer
                self._count("retransmitted_requests")
                self._emit(self._cached_response[1])
            return
        if msg.message_id != self._peer_mid:
            self._drop("bad_message_id")
            return
        inner = self._open(msg)
        if inner is None:
            return
        # §2.23: follow the peer's address/port once a message authenticates (NAT mapping changed)
        if (src_port != self.remote_port or src != self.remote) and self.state == "established" and self.nat:
            self.remote, self.remote_port = src, src_port
            self._count("peer_moved")
            self._events.append(PeerMoved(self, src, src_port))
        elif src_port != self.remote_port or src != self.remote:
            self.remote, self.remote_port = src, src_port
        self.local_port = dst_port
        self._peer_mid += 1
        self.heard(now)
        if msg.exchange == Exchange.IKE_AUTH and self.state == "init_done":
            # §2.4: the peer says it has no other IKE SA with us (the manager's uniqueness policy reads it)
            self.initial_contact = any(isinstance(p, m.Notify) and p.notify_type == Notify.INITIAL_CONTACT
                                       for p in inner)  # fmt: skip
            self._on_auth_request(msg, inner, now)
        elif msg.exchange == Exchange.INFORMATIONAL and self.state in ("established", "deleting"):
            self._on_informational(msg, inner, now)
        elif msg.exchange == Exchange.CREATE_CHILD_SA and self.state == "established":
            self._on_create_child(msg, inner, now)
        else:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)] if msg.exchange != Exchange.CREATE_CHILD_SA
                          else [m.Notify(Notify.NO_ADDITIONAL_SAS)])  # fmt: skip

    def _on_informational(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        reply: list[m.AnyPayload] = []
        closing = refused = False
        for p in inner:
            if isinstance(p, m.Delete):
                if p.protocol == Protocol.IKE:
                    closing = True
                elif p.protocol in (Protocol.ESP, Protocol.AH):
                    ours = []
                    for spi in p.spis:
                        for c in list(self.children):
                            # SPIs are per protocol (RFC 4301 §4.1): an AH delete names AH SAs only
                            if c.spi_out == int.from_bytes(spi, "big") and c.child.ike_protocol == p.protocol:
                                ours.append(c.spi_in.to_bytes(4, "big"))
                                self._child_gone(c, "peer")
                    if ours:
                        reply.append(m.Delete(p.protocol, ours))
            elif isinstance(p, m.Notify) and p.notify_type == Notify.AUTHENTICATION_FAILED:
                refused = True  # §2.21.2: the initiator did not accept our IKE_AUTH response
        self._respond(msg, reply)
        if refused:
            what = "PSK" if self.cfg.creds.local == "psk" else "certificate (is our CA in its cacerts?)"
            self._close(f"peer says AUTHENTICATION_FAILED: check the {what} and the identities on both sides")
        elif closing:
            if self.successor is not None:
                self._close("rekeyed", "rekeyed")
            else:
                self._close("peer deleted the IKE SA", "peer")

    def rekey_child_now(self, spi_in: int, now: float) -> bool:
        """A volume (soft) lifetime of a child SA was reached: rekey it as soon as the window allows."""
        c = next((c for c in self.children if c.spi_in == spi_in or c.spi_out == spi_in), None)
        if c is None or self.state != "established":
            return False
        c.rekey_at = now
        return True

    def child_expired(self, spi: int, now: float) -> bool:
        """A child SA hit its hard lifetime in the datapath: tell the peer and forget it (§1.4.1)."""
        c = next((c for c in self.children if spi in (c.spi_in, c.spi_out)), None)
        if c is None:
            return False
        if self.state == "established":
            self._delete_child(c, now)
        else:
            self._child_gone(c)
        return True

    def close_now(self, reason: str, now: float, cause: str = "local") -> None:
        """Send one DELETE for the IKE SA without waiting for (or retransmitting) it, and close at once:
        for an SA past its hard lifetime or replaced by the uniqueness policy, whose peer may be gone."""
        if self.state in ("established", "deleting") and self.tx is not None:
            self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)
        self._close(reason, cause)

    def refuse_auth(self, reason: str) -> bool:
        """Responder, right after an IKE_AUTH request authenticated the peer and before its output was
        collected: answer AUTHENTICATION_FAILED instead and close (uniqueness policy ``keep``, as strongSwan).
        The IKE_AUTH response, IkeUp and ChildUp are withdrawn. False when it is too late for that."""
        cached = self._cached_response
        if self.initiator or self.state != "established" or cached is None \
                or not any(isinstance(e, IkeUp) for e in self._events):  # fmt: skip
            return False
        mid, data = cached
        self._out = [d for d in self._out if d.data != data]
        self._events = [e for e in self._events if not isinstance(e, IkeUp | ChildUp)]
        self.children.clear()
        self._queue.clear()
        self._respond(m.Message(self.spi_i, self.spi_r, Exchange.IKE_AUTH, 0, mid),
                      [m.Notify(Notify.AUTHENTICATION_FAILED)])  # fmt: skip
        self._count("refused_by_uniqueness")
        self._close(reason, "failed")
        return True

    def create_child(self, name: str, now: float) -> bool:
        """Negotiate the configured child ``name`` again over CREATE_CHILD_SA (§1.3.1), unless an SA of it
        is up or being negotiated. False if there is no such child or the IKE SA is not established."""
        child = next((c for c in self.cfg.children if c.name == name), None)
        if child is None or self.state != "established":
            return False
        busy = (
            any(c.child.name == name for c in self.children)
            or (self._pending is not None and self._pending[0] == "new_child" and self._pending[1][0].name == name)
            or any(isinstance(f, functools.partial) and f.args and f.args[0] is child for f in self._queue)
        )
        if not busy:
            self._queue.append(functools.partial(self._create_child, child))
            self._next_queued(now)
        return True

    @property
    def peer_virtual_ip(self) -> str | None:
        """The address we leased to the peer from a pool (§3.15), if any."""
        if self._lease is None:
            return None
        addr = self._lease[0].leases.get(self._lease[1])
        return None if addr is None else str(addr)

    def delete(self, now: float, cause: str = "local") -> None:
        """Start deleting the IKE SA (its children go with it, §1.4.1); ``cause`` is for its IkeDown."""
        if self.state != "established":
            self._close("deleted before establishment")
            return
        self.state = "deleting"
        self._delete_cause = cause
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)

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
        if src.data != want_src or dst.data != want_dst or self.nat:
            self.nat = True
            if self.initiator:
                self.local_port = NAT_T_PORT
                self.remote_port = NAT_T_PORT

    def _octets(self, initiator_side: bool, ident: m.Identification) -> bytes:
        """RFC 7296 §2.15: what the initiator (or the responder) signs or MACs."""
        assert self.chosen is not None and self.chosen.prf is not None and self.keys is not None
        if initiator_side:
            return auth.signed_octets(self._init_request, self._nr, self.chosen.prf, self.keys.sk_pi, ident)
        return auth.signed_octets(self._init_response, self._ni, self.chosen.prf, self.keys.sk_pr, ident)

    def _prove(self, ident: m.Identification) -> list[m.AnyPayload]:
        """Our CERT payloads (certificate auth) and, last, our AUTH payload."""
        octets = self._octets(self.initiator, ident)
        creds = self.cfg.creds
        if creds.local == "pubkey":
            assert creds.key is not None, "connections.py guarantees a private key for local.auth = pubkey"
            return [*creds.cert_payloads(), auth.sign(creds.key, octets, self._peer_hashes)]
        assert self.chosen is not None and self.chosen.prf is not None
        return [m.Auth(AuthMethod.PSK, auth.psk_auth(self.chosen.prf, self.cfg.psk, octets))]

    def _verify_peer(self, ident: m.Identification, proof: m.Auth, inner: list[m.AnyPayload]) -> str | None:
        """Why the peer's AUTH does not prove its identity (None: it does)."""
        creds = self.cfg.creds
        octets = self._octets(not self.initiator, ident)
        if creds.remote == "psk":
            if proof.method != AuthMethod.PSK:
                return f"it signed ({auth.describe(proof)}) but remote.auth = psk expects a pre-shared key"
            assert self.chosen is not None and self.chosen.prf is not None
            ok = hmac.compare_digest(proof.data, auth.psk_auth(self.chosen.prf, self.cfg.psk, octets))
            self.peer_auth = "psk" if ok else ""
            return None if ok else "AUTH does not verify: the PSK differs"
        if proof.method == AuthMethod.PSK:
            return "it used a pre-shared key but remote.auth = pubkey expects a certificate signature"
        try:
            sent = [x509.load_der_x509_certificate(p.data) for p in inner if isinstance(p, m.Certificate)
                    and not p.request and p.encoding == auth.CERT_X509_SIGNATURE]  # fmt: skip
        except ValueError:
            return "a CERT payload is not a valid DER X.509 certificate"
        pinned = [c for c in creds.peer_certs if cert_has_id(c, ident.id_type, ident.data)]
        if not sent and not pinned:
            return "it sent no certificate (strongSwan sends one when asked: keep send_certreq) and none is pinned"
        leaf = sent[0] if sent else pinned[0]
        if self.wallclock is None:
            return "no wall clock was given to check certificate validity"
        why = verify_path(leaf, sent[1:], list(creds.cacerts), list(creds.peer_certs), self.wallclock())
        if why is not None:
            return why
        if not cert_has_id(leaf, ident.id_type, ident.data):
            return f"its identity is not in its certificate {subject(leaf)!r} (neither subject nor subjectAltName)"
        why = auth.verify(leaf, proof, octets)
        if why is None:
            self.peer_cert, self.peer_auth = leaf, auth.describe(proof)
        return why

    def _new_child_spi(self) -> int:
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 256:
                return spi

    def _established(self, now: float = 0.0) -> None:
        self.state = "established"
        self.up_at = now
        self._schedule_ike_rekey(now)
        t = self.cfg.reauth_time
        if t:
            # strongSwan's reauth_time: independent of rekey_time, a little early by a random amount, like rekeys
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * t
            self.reauth_at = now + t - jitter
        self._events.append(IkeUp(self))

    @property
    def idle(self) -> bool:
        """No request of ours outstanding or queued (the window is free)."""
        return self._outstanding is None and not self._queue

    def reauth_failed(self, now: float) -> float | None:
        """The new IKE SA of our reauthentication failed: try again later, a bounded number of times.
        Returns when (None: no more tries)."""
        self._reauth_tries += 1
        self._count("reauths_failed")
        retry = now + REAUTH_RETRY_DELAY if self._reauth_tries < REAUTH_TRIES and self.established else None
        self.reauth_at = retry
        return retry

    def _schedule_ike_rekey(self, now: float) -> None:
        t = self.cfg.rekey_time
        if t:
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * t
            self.rekey_at = now + t - jitter
            # strongSwan's over_time: if rekeying keeps failing, the IKE SA ends here (default 10% of rekey_time)
            over = self.cfg.over_time if self.cfg.over_time is not None else t / 10
            self.expire_at = now + t + over

    def _child_up(self, child: ChildConfig, chosen: props.Chosen, mode: str, local: list[Range],
                  remote: list[Range], *, spi_in: int, spi_out: int, nonces: tuple[bytes, bytes] | None = None,
                  shared: bytes | None = None, we_initiated: bool | None = None, replaces: int | None = None,
                  now: float = 0.0) -> None:  # fmt: skip
        assert self.chosen is not None and self.chosen.prf is not None and self.keys is not None
        suite = chosen.child_suite
        ni, nr = nonces or (self._ni, self._nr)
        # §2.17: ESP takes encryption then integrity keys per direction; AH integrity keys only
        km_len = suite.key_len if chosen.protocol == Protocol.AH else chosen.esp_suite
        i2r, r2i = child_keymat(self.chosen.prf, self.keys.sk_d, ni, nr, km_len, shared)
        initiator = self.initiator if we_initiated is None else we_initiated
        key_in, key_out = (r2i, i2r) if initiator else (i2r, r2i)
        encap = (self.local_port, self.remote_port) if self.nat else None
        rekey_at = None
        if initiator and child.rekey_time:
            # §2.8: rekey before expiry, a little early by a random amount, so both ends rarely collide
            jitter = int.from_bytes(self.rng(2), "big") / 65535 * self.cfg.rekey_jitter * child.rekey_time
            rekey_at = now + child.rekey_time - jitter
        up = ChildUp(self, child, mode, suite.keyword, chosen.esn, spi_in, spi_out, key_in, key_out, local, remote,
                     encap, replaces, rekey_at, "ah" if chosen.protocol == Protocol.AH else "esp")  # fmt: skip
        self.children.append(up)
        self._events.append(up)

    def _child_gone(self, c: ChildUp, cause: str = "local") -> None:
        self._rekeys_done.pop(c.spi_in, None)
        if c in self.children:
            self.children.remove(c)
            if any(o.child.name == c.child.name for o in self.children):
                cause = "rekeyed"  # retired after a rekey (or a collision): its config still has an SA
            self._events.append(ChildDown(self, c.spi_in, c.spi_out, c.child, cause))

    # --- CREATE_CHILD_SA: rekeying a child SA (§1.3.3, §2.8) --------------------------------------

    def _child_request(self, child: ChildConfig, local: list[Range], remote: list[Range], mode: str,
                       rekey_spi: int | None) -> tuple[list[m.AnyPayload], int, bytes, Any]:  # fmt: skip
        """Initiator side of CREATE_CHILD_SA for a child SA (new, or rekeying ``rekey_spi``): the payloads
        [N(REKEY_SA)], SA, Ni, [KEi when the proposal has a group: PFS], TSi, TSr; plus our SPI, Ni and the
        KE private value."""
        spi_in = self._new_child_spi()
        nonce = self.rng(32)
        spi = spi_in.to_bytes(4, "big")
        inner: list[m.AnyPayload] = []
        if rekey_spi is not None:
            # §3.10.1: the REKEY_SA notify names the protocol of the SA being rekeyed
            inner.append(m.Notify(Notify.REKEY_SA, b"", child.ike_protocol, rekey_spi.to_bytes(4, "big")))
        inner.append(m.SA([p.to_payload(i + 1, spi) for i, p in enumerate(child.proposals)]))
        inner.append(m.Nonce(nonce))
        group = child.proposals[0].dh[0] if child.proposals[0].dh else None
        dh = None
        if group is not None:
            dh, pub = group.generate(self.rng)
            inner.append(m.KE(group.number, pub))
        inner.append(m.TS([r.to_payload() for r in local], True))
        inner.append(m.TS([r.to_payload() for r in remote], False))
        if mode == "transport":
            inner.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        return inner, spi_in, nonce, dh

    def _child_answer(self, child: ChildConfig, inner: list[m.AnyPayload],
                      dh: Any) -> tuple[props.Chosen, bytes, bytes | None] | str:  # fmt: skip
        """Initiator side: check a CREATE_CHILD_SA response; ``(chosen, Nr, g^ir)`` or why it failed."""
        errors = [p for p in inner if isinstance(p, m.Notify) and p.notify_type < 16384]
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        if errors:
            return _notify_name(errors[0].notify_type)
        if len(sas) != 1 or len(sas[0].proposals) != 1 or nonce is None:
            return "malformed response"
        chosen = props.check_choice(child.proposals, sas[0].proposals[0], child.ike_protocol)
        if chosen is None or len(chosen.spi) != 4:
            return "the peer chose a proposal we did not offer"
        shared = None
        if chosen.dh is not None:
            ke = next((p for p in inner if isinstance(p, m.KE)), None)
            try:
                if ke is None or dh is None:
                    raise KeyExchangeError("no KE payload for PFS")
                shared = chosen.dh.shared(dh, ke.data)
            except KeyExchangeError as e:
                return str(e)
        return chosen, nonce.data, shared

    def _rekey_child(self, old: ChildUp, now: float) -> None:
        old.rekey_at = None
        inner, spi_in, nonce, dh = self._child_request(old.child, old.local_ts, old.remote_ts, old.mode, old.spi_in)
        self._pending = ("rekey_child", (old, spi_in, nonce, dh))
        self._count("child_rekeys_started")
        self._send_request(Exchange.CREATE_CHILD_SA, inner, now)

    def _on_rekey_response(self, inner: list[m.AnyPayload], state: Any, now: float) -> None:
        old, spi_in, nonce_i, dh = state
        answer = self._child_answer(old.child, inner, dh)
        if isinstance(answer, str):
            self._child_failed(f"rekey of child SA {old.child.name} refused: {answer}", "child_rekey_failed")
            old.rekey_at = now + 30.0  # try again later; the old SA keeps carrying traffic
            return
        chosen, nr, shared = answer
        self._child_up(old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=spi_in,
                       spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce_i, nr), shared=shared,
                       we_initiated=True, replaces=old.spi_in, now=now)  # fmt: skip
        self._count("child_rekeys")
        if self._rekey_collision(old, nonce_i, nr, self.children[-1], True, now):
            return
        # make-before-break: the new pair is installed; now retire the old one (§2.8)
        self._delete_child(old, now)

    def _rekey_collision(
        self, old: ChildUp, ni: bytes, nr: bytes, new: ChildUp, we_initiated: bool, now: float
    ) -> bool:
        """§2.8.1: both ends rekeyed the same child SA. The new SA made with the lowest of the four nonces
        is redundant and is deleted by the end that initiated its exchange. True if this was a collision."""
        done = self._rekeys_done.setdefault(old.spi_in, [])
        done.append((ni, nr, new, we_initiated))
        if len(done) < 2:
            return False
        self._count("rekey_collisions")
        (a_ni, a_nr, a_new, a_ours), (b_ni, b_nr, b_new, b_ours) = done[:2]
        del self._rekeys_done[old.spi_in]
        redundant, ours = (a_new, a_ours) if min(a_ni, a_nr) < min(b_ni, b_nr) else (b_new, b_ours)

        if ours:
            self._queue.append(functools.partial(self._delete_child, redundant))
        if old in self.children and we_initiated:
            self._queue.append(functools.partial(self._delete_child, old))
        self._next_queued(now)
        return True

    def _delete_child(self, c: ChildUp, now: float) -> None:
        if c not in self.children:
            return
        if self._outstanding is not None:
            self._queue.append(functools.partial(self._delete_child, c))
            return
        self._pending = ("delete_child", c)
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(c.child.ike_protocol, [c.spi_in.to_bytes(4, "big")])],
                           now)  # fmt: skip

    def _send_delete(self, delete: m.Delete, now: float) -> None:
        """An INFORMATIONAL with a Delete for SAs that are not (or no longer) among our children."""
        self._pending = ("delete_spi", None)
        self._send_request(Exchange.INFORMATIONAL, [delete], now)

    # --- CREATE_CHILD_SA: a new child SA (§1.3.1) ------------------------------------------------

    def _create_child(self, child: ChildConfig, now: float) -> None:
        """Initiator: another configured child SA over CREATE_CHILD_SA, with PFS if its proposal has a group."""
        if self.nat and child.protocol == "ah":
            self._child_failed(f"child SA {child.name} not proposed: {AH_NAT}")
            return
        inner, spi_in, nonce, dh = self._child_request(child, child.local_ts, child.remote_ts, child.mode, None)
        self._pending = ("new_child", (child, spi_in, nonce, dh))
        self._send_request(Exchange.CREATE_CHILD_SA, inner, now)

    def _on_new_child_response(self, inner: list[m.AnyPayload], state: Any, now: float) -> None:
        child, spi_in, nonce_i, dh = state
        answer = self._child_answer(child, inner, dh)
        tsi = next((p for p in inner if isinstance(p, m.TS) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, m.TS) and not p.initiator), None)
        if isinstance(answer, str) or tsi is None or tsr is None:
            self._child_failed(f"child SA {child.name} refused: {answer if isinstance(answer, str) else 'no TS'}")
            return
        chosen, nr, shared = answer
        transport = any(isinstance(p, m.Notify) and p.notify_type == Notify.USE_TRANSPORT_MODE for p in inner)
        self._child_up(child, chosen, "transport" if transport else "tunnel",
                       [Range.from_payload(t) for t in tsi.selectors], [Range.from_payload(t) for t in tsr.selectors],
                       spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce_i, nr),
                       shared=shared, we_initiated=True, now=now)  # fmt: skip

    def _on_new_child_request(self, msg: m.Message, inner: list[m.AnyPayload], nonce: m.Nonce, now: float) -> None:
        result = self._negotiate_child(inner, ignore_dh=False)
        if isinstance(result, int):
            self._respond(msg, [m.Notify(result)])
            return
        child, chosen, mode, tsi, tsr = result
        reply = self._child_reply(msg, inner, chosen, mode, tsi, tsr)
        if reply is not None:
            spi_in, nr, shared = reply
            self._child_up(child, chosen, mode, tsr, tsi, spi_in=spi_in, spi_out=int.from_bytes(chosen.spi, "big"),
                           nonces=(nonce.data, nr), shared=shared, we_initiated=False, now=now)  # fmt: skip

    def _child_reply(self, msg: m.Message, inner: list[m.AnyPayload], chosen: props.Chosen, mode: str,
                     tsi: list[Range], tsr: list[Range]) -> tuple[int, bytes, bytes | None] | None:  # fmt: skip
        """Responder: answer a CREATE_CHILD_SA request for a child SA (new or rekeyed) with SA, Nr, [KEr]
        (PFS when the chosen proposal has a group), TSi, TSr. Returns ``(our SPI, Nr, g^ir)``, or None
        after answering with an error notify."""
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        spi_in = self._new_child_spi()
        nr = self.rng(32)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, None, chosen.dh, chosen.esn, chosen.number,
                             spi_in.to_bytes(4, "big"))  # fmt: skip
        out: list[m.AnyPayload] = [m.SA([reply.to_payload()]), m.Nonce(nr)]
        shared = None
        if chosen.dh is not None:
            if ke is None or ke.group != chosen.dh.number:
                self._respond(msg, [m.Notify(Notify.INVALID_KE_PAYLOAD, chosen.dh.number.to_bytes(2, "big"))])
                return None
            priv, pub = chosen.dh.generate(self.rng)
            try:
                shared = chosen.dh.shared(priv, ke.data)
            except KeyExchangeError:
                self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
                return None
            out.append(m.KE(chosen.dh.number, pub))
        out += [m.TS([r.to_payload() for r in tsi], True), m.TS([r.to_payload() for r in tsr], False)]
        if mode == "transport":
            out.append(m.Notify(Notify.USE_TRANSPORT_MODE))
        self._respond(msg, out)
        return spi_in, nr, shared

    # --- CREATE_CHILD_SA: rekeying the IKE SA (§1.3.2, §2.18) ---------------------------------------

    def _rekey_ike(self, now: float) -> None:
        assert self.chosen is not None and self.chosen.dh is not None
        self.rekey_at = None
        spi = self.rng(8)
        nonce = self.rng(32)
        group = self.chosen.dh
        priv, pub = group.generate(self.rng)
        sa = m.SA([p.to_payload(i + 1, spi) for i, p in enumerate(self.cfg.proposals)])
        self._pending = ("rekey_ike", (spi, nonce, priv))
        self._count("ike_rekeys_started")
        self._send_request(Exchange.CREATE_CHILD_SA, [sa, m.Nonce(nonce), m.KE(group.number, pub)], now)

    def _on_ike_rekey_response(self, inner: list[m.AnyPayload], state: Any, now: float) -> None:
        spi_i, ni, priv = state
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        chosen = None
        if len(sas) == 1 and len(sas[0].proposals) == 1:
            chosen = props.check_choice(self.cfg.proposals, sas[0].proposals[0], Protocol.IKE)
        if chosen is None or nonce is None or ke is None or chosen.dh is None or ke.group != chosen.dh.number \
                or len(chosen.spi) != 8:  # fmt: skip
            self._count("ike_rekey_failed")
            self.rekey_at = now + 30.0
            return
        try:
            shared = chosen.dh.shared(priv, ke.data)
        except KeyExchangeError:
            self.rekey_at = now + 30.0
            return
        self._successor(chosen, spi_i, chosen.spi, ni, nonce.data, shared, initiator=True, now=now)
        # the old IKE SA is retired by its rekey initiator (§1.3.2)
        self._pending = ("delete_old_ike", None)
        self._send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.IKE, [])], now)

    def _on_ike_rekey_request(self, msg: m.Message, inner: list[m.AnyPayload], sa: m.SA, nonce: m.Nonce,
                              now: float) -> None:  # fmt: skip
        chosen = props.select(self.cfg.proposals, sa.proposals, Protocol.IKE)
        ke = next((p for p in inner if isinstance(p, m.KE)), None)
        if chosen is None or chosen.dh is None or len(chosen.spi) != 8:
            self._respond(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            return
        if ke is None or ke.group != chosen.dh.number:
            self._respond(msg, [m.Notify(Notify.INVALID_KE_PAYLOAD, chosen.dh.number.to_bytes(2, "big"))])
            return
        priv, pub = chosen.dh.generate(self.rng)
        try:
            shared = chosen.dh.shared(priv, ke.data)
        except KeyExchangeError:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return
        spi_r = self.rng(8)
        nr = self.rng(32)
        reply = props.Chosen(chosen.protocol, chosen.encr, chosen.integ, chosen.prf, chosen.dh, False, chosen.number,
                             spi_r)  # fmt: skip
        self._respond(msg, [m.SA([reply.to_payload()]), m.Nonce(nr), m.KE(chosen.dh.number, pub)])
        self._successor(chosen, chosen.spi, spi_r, nonce.data, nr, shared, initiator=False, now=now)

    def _successor(self, chosen: props.Chosen, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes, shared: bytes,
                   *, initiator: bool, now: float) -> None:  # fmt: skip
        """Create the rekeyed IKE SA and move the child SAs to it (§2.18)."""
        assert self.keys is not None and self.chosen is not None and chosen.prf is not None
        new = IkeSa(self.cfg, initiator=initiator, rng=self.rng, now=now, wallclock=self.wallclock, remote=self.remote,
                    remote_port=self.remote_port)  # fmt: skip
        new.local_port = self.local_port
        new.nat = self.nat
        new.behind_nat = self.behind_nat
        new.peer_id = self.peer_id
        new._lease = self._lease
        new.spi_i, new.spi_r = spi_i, spi_r
        new._ni, new._nr = ni, nr
        encr_len = chosen.encr.key_len + chosen.encr.salt_len
        integ_len = 0 if chosen.encr.aead or chosen.integ is None else chosen.integ.key_len
        _, keys = ike_sa_keys(chosen.prf, shared, ni, nr, spi_i, spi_r, encr_len, integ_len,
                              old_sk_d=self.keys.sk_d, old_prf=self.chosen.prf)  # fmt: skip
        new.chosen = chosen
        new.keys = keys
        integ = None if chosen.encr.aead else chosen.integ
        i_keys = sk.SkKeys(chosen.encr, integ, keys.sk_ei, keys.sk_ai)
        r_keys = sk.SkKeys(chosen.encr, integ, keys.sk_er, keys.sk_ar)
        new.tx, new.rx = (i_keys, r_keys) if initiator else (r_keys, i_keys)
        new._next_mid = 0
        new._peer_mid = 0
        new.state = "established"
        new.up_at = now
        new._schedule_ike_rekey(now)
        new.reauth_at, self.reauth_at = self.reauth_at, None  # rekeying is no reauthentication: the time stands
        new.children, self.children = self.children, []
        new.last_heard = now
        self.successor = new
        self.rekey_at = None
        self.state = "deleting"  # the old SA only waits for (or sends) its DELETE now
        self._count("ike_rekeys")
        self._events.append(IkeRekeyed(self, new))

    def _on_create_child(self, msg: m.Message, inner: list[m.AnyPayload], now: float) -> None:
        rekey = next((p for p in inner if isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA), None)
        sas = [p for p in inner if isinstance(p, m.SA)]
        nonce = next((p for p in inner if isinstance(p, m.Nonce)), None)
        if rekey is None and len(sas) == 1 and nonce is not None and sas[0].proposals \
                and sas[0].proposals[0].protocol == Protocol.IKE:  # fmt: skip
            self._on_ike_rekey_request(msg, inner, sas[0], nonce, now)
            return
        if rekey is None and len(sas) == 1 and nonce is not None:
            self._on_new_child_request(msg, inner, nonce, now)
            return
        if rekey is None or len(sas) != 1 or nonce is None:
            self._respond(msg, [m.Notify(Notify.INVALID_SYNTAX)])
            return
        spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
        old = next((c for c in self.children if spi in (c.spi_out, c.spi_in)
                    and c.child.ike_protocol == rekey.protocol), None)  # fmt: skip
        if old is None:
            self._respond(msg, [m.Notify(Notify.CHILD_SA_NOT_FOUND, b"", rekey.protocol, rekey.spi)])
            return
        chosen = props.select(old.child.proposals, sas[0].proposals, old.child.ike_protocol)
        if chosen is None or len(chosen.spi) != 4:
            self._respond(msg, [m.Notify(Notify.NO_PROPOSAL_CHOSEN)])
            return
        reply = self._child_reply(msg, inner, chosen, old.mode, old.remote_ts, old.local_ts)
        if reply is None:
            return
        spi_in, nr, shared = reply
        self._child_up(old.child, chosen, old.mode, old.local_ts, old.remote_ts, spi_in=spi_in,
                       spi_out=int.from_bytes(chosen.spi, "big"), nonces=(nonce.data, nr), shared=shared,
                       we_initiated=False, replaces=old.spi_in, now=now)  # fmt: skip
        self._count("child_rekeys")
        ours_pending = self._pending is not None and self._pending[0] == "rekey_child" and self._pending[1][0] is old
        if ours_pending or old.spi_in in self._rekeys_done:
            self._rekey_collision(old, nonce.data, nr, self.children[-1], False, now)

    def _child_failed(self, reason: str, counter: str = "child_failed") -> None:
        self._count(counter)
        self.failure = reason
        self._events.append(ChildFailed(self, reason))

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
        self.state = "closed"
        self._outstanding = None
        for c in self.children:
            self._events.append(ChildDown(self, c.spi_in, c.spi_out, c.child, "ike"))
        self.children.clear()
        self._events.append(IkeDown(self, reason, cause))

    def _drop(self, reason: str) -> None:
        self._count(f"dropped_{reason}")

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    failure: str = ""


def same_identity(a: tuple[int, bytes], b: tuple[int, bytes]) -> bool:
    """Two IKE identities are the same; DNs compare attribute by attribute (RFC 4517 matching, simplified)."""
    if a[0] == b[0] == IdType.ID_DER_ASN1_DN:
        return same_dn(a[1], b[1])
    return a == b


def _hashes(msg: m.Message) -> frozenset[int] | None:
    n = next((n for n in msg.notifies() if n.notify_type == Notify.SIGNATURE_HASH_ALGORITHMS), None)
    return None if n is None else auth.parse_hashes(n.data)


def _notify_name(n: int) -> str:
    try:
        return Notify(n).name
    except ValueError:
        return str(n)
