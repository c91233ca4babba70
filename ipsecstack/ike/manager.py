"""Many IKE SAs behind one endpoint (sans-IO): demultiplexing by SPI, responder creation, initiation.

Theory of operation
-------------------
``receive(data, src, src_port, dst_port, now)`` routes a datagram: an IKE_SA_INIT request with a zero
responder SPI creates a responder SA (or, for a retransmission, reaches the one already created for
that initiator SPI and address); anything else is looked up by our own SPI (the initiator SPI for SAs
we started, the responder SPI for the others). Datagrams for no SA are dropped and counted; nothing an
unauthenticated peer sends creates more than one half-open SA per IKE_SA_INIT.

Connections (profiles): every connection whose ``remote_addrs`` fits the source address is a candidate
of the new responder SA; IKE_SA_INIT is answered with the first whose proposals fit the offer (a
connection naming that exact address before the ``%any`` ones), and IKE_AUTH may switch the SA to
another candidate by the peer's identity and authentication (:mod:`ipsecstack.ike.profiles`).

Cookies (§2.6): once ``cookie_threshold`` half-open SAs exist, an IKE_SA_INIT request must carry a
valid COOKIE (:mod:`stateless`); without one it gets a COOKIE answer and no state at all. Beyond
``half_open_limit`` half-open SAs, requests are dropped and counted even with a cookie.

Uniqueness (strongSwan's ``unique``): when an IKE_AUTH request authenticates a peer, before anything
leaves, the other established IKE SAs of the same connection and peer identity are looked up. ``replace``
closes them (one DELETE each, not waited for); ``keep`` refuses the new one with AUTHENTICATION_FAILED;
``no`` (the default) replaces only if the peer sent INITIAL_CONTACT, which says it lost every other IKE
SA with us (§2.4); ``never`` allows any number.

Reauthentication (``reauth_time``, RFC 7296 §2.8.3): make-before-break, in :mod:`reauth`. On either
side, an IKE SA the peer deletes while a newer established IKE SA of the same connection and peer identity
stays reports cause ``"reauth"`` instead of ``"peer"``: the connection is up, so no close action applies.

Unknown major version (§2.5, §1.5): dropped and counted; a request is answered with a rate-limited
INVALID_MAJOR_VERSION (:mod:`stateless`).

Reqids: every child SA that comes up gets the reqid binding its SAs to their policies (:mod:`reqids`).

IKE SA rekeys (§2.18): the new IKE SA an exchange makes is demultiplexed to, under our SPI, from
the moment it exists (``IkeSa.spawned``), not only once it takes over (``IkeRekeyed``): when both
ends rekey at once (§2.8.2) the peer may use or delete either new SA before this end has decided.

Outputs. Every input (``receive``, ``handle_timer``, ``initiate`` and the calls that act on one SA:
``delete``, ``create_child``, ``rekey``, ``child_lifetime``) ends with a settle step over the IKE SAs that produced
something (each SA tells the manager when it has output: a ready set, so the cost per datagram is that of
the SAs with work, not of all of them): their datagrams and events move to the manager's queues, the
policies above act on the events (a ``ReauthDue`` starts the new IKE SA, a reauthentication whose new SA
is up retires the old one), and closed SAs are forgotten. ``datagrams()`` and ``events()`` only hand over
those queues; they change nothing. Events of live IKE SAs come before those of SAs that closed in the same
step, so that an SA replaced by a newer one (unique, reauth) reports its ChildDown after the newer one's
ChildUp and the shared policies (same reqid) never go away in between. ``get_timer()`` reads a heap of the
SAs' timers, refreshed for the SAs each step touched; ``handle_timer`` pops the due ones and runs only those.
So an SA's timers change only through these calls (``rekey``, not ``sa.rekey_at = ...``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from ipsecstack.entropy import Rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Exchange, Protocol
from ipsecstack.ike.groups import KeyPairSource
from ipsecstack.ike.reauth import Reauths
from ipsecstack.ike.reqids import Reqids
from ipsecstack.ike.session import (
    ChildDown,
    ChildUp,
    Datagram,
    Event,
    IkeDown,
    IkeRekeyed,
    IkeSa,
    PeerConfig,
    ReauthDue,
    id_text,
    same_identity,
)
from ipsecstack.ike.stateless import MAJOR_VERSION_BURST, MAJOR_VERSION_RATE, Stateless

DEFAULT_HALF_OPEN_LIMIT = 256
DEFAULT_COOKIE_THRESHOLD = 32


class IkeManager:
    def __init__(self, peers: list[PeerConfig], rng: Rng, *, half_open_limit: int = DEFAULT_HALF_OPEN_LIMIT,
                 cookie_threshold: int = DEFAULT_COOKIE_THRESHOLD,
                 wallclock: Callable[[], float] | None = None,
                 keypairs: KeyPairSource | None = None) -> None:  # fmt: skip
        self.peers = {p.name: p for p in peers}
        self.rng = rng
        self.wallclock = wallclock  # time of day for certificate validity, handed to every IKE SA
        self.keypairs = keypairs  # KE key pairs made ahead of time (ike/groups.py), handed to every IKE SA
        self.half_open_limit = half_open_limit
        self.cookie_threshold = cookie_threshold
        self.stateless = Stateless(rng, self._count)  # cookies and INVALID_MAJOR_VERSION answers (no state per peer)
        self.sas: dict[bytes, IkeSa] = {}
        self._init_index: dict[tuple[bytes, str], IkeSa] = {}
        self._unattached: list[Datagram] = []  # answers of no SA (cookies, INVALID_MAJOR_VERSION, refusals)
        self._out: list[Datagram] = []  # the SAs' datagrams, settled
        self._events: list[Event] = []  # the SAs' events and the manager's own, settled
        self._ready: dict[int, IkeSa] = {}  # id -> SA with output not yet settled
        self._heap: list[tuple[float, int, IkeSa]] = []  # (timer, id, SA), stale entries skipped
        self._when: dict[int, float] = {}  # id -> the timer the heap holds for it
        self._by_child: dict[int, IkeSa] = {}  # inbound SPI of a child SA -> the IKE SA that has it
        self.reqids = Reqids()  # which reqid each child SA gets (reqids.py); ``reqids.traps`` is the runtime's
        self.stats: dict[str, int] = {}
        self.failures: list[tuple[str, str]] = []
        self.reauths = Reauths(self._start, self._count, self._wake)  # reauthentications under way (reauth.py)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def initiate(self, name: str, now: float) -> IkeSa:
        sa = self._start(name, now)
        self._settle(now)
        return sa

    def _start(self, name: str, now: float) -> IkeSa:
        cfg = self.peers[name]
        sa = IkeSa(cfg, initiator=True, rng=self.rng, now=now, wallclock=self.wallclock, keypairs=self.keypairs)
        # §2.4: INITIAL_CONTACT tells the peer to drop every other IKE SA with us: only if we have none
        sa.send_initial_contact = not any(o.cfg.name == name and o.state != "closed" for o in self.sas.values())
        sa.on_output = self._wake
        sa.start(now)
        self.sas[sa.spi_i] = sa
        return sa

    def by_name(self, name: str) -> list[IkeSa]:
        return [sa for sa in self.sas.values() if sa.cfg.name == name]

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        try:
            spi_i, spi_r, _np, version, exchange, flags, _mid, _len = m.decode_header(data)
        except m.ParseError:
            self._count("dropped_truncated")
            return
        if version >> 4 > m.MAJOR_VERSION:  # §2.5: dropped; a request gets INVALID_MAJOR_VERSION, rate-limited
            reply = self.stateless.major_version(data, src, src_port, dst_port, now)
            if reply is not None:
                self._unattached.append(reply)
            return
        response = bool(flags & 0x20)
        if exchange == Exchange.IKE_SA_INIT and not response and spi_r == bytes(8):
            self._init_request(data, src, src_port, dst_port, now)
            return
        # The I flag marks the original initiator as sender (§3.1): then we are the responder and the
        # SA is ours under the responder SPI; otherwise we initiated it and it is ours under SPIi.
        sa = self.sas.get(spi_r if flags & 0x08 else spi_i)
        if sa is None:
            self._count("dropped_unknown_spi")
            return
        before = sa.state
        if before == "init_done":
            # IKE_AUTH may switch to another candidate: only to one still configured (not replaced by a reload)
            sa.candidates = [c for c in sa.candidates if c is sa.cfg or self.peers.get(c.name) is c]
        sa.receive(data, src, src_port, dst_port, now)
        self._wake(sa)  # its timer may have moved without output (an answered request): refresh it
        if before == "init_done" and sa.established:
            self._enforce_unique(sa, now)
        self._settle(now)

    def _enforce_unique(self, new: IkeSa, now: float) -> None:
        """A responder SA just authenticated its peer: apply the connection's ``unique`` policy."""
        policy = new.cfg.unique
        if policy == "never" or (policy == "no" and not new.initial_contact):
            return
        others = self._same_peer(new)
        if not others:
            return
        peer = id_text(*new.peer_id) if new.peer_id else "?"
        if policy == "keep":
            if new.refuse_auth(f"{peer!r} already has an IKE SA of this connection (unique = keep)"):
                self._count("unique_refused")
            return
        why = "unique = replace" if policy == "replace" else "INITIAL_CONTACT from the peer (RFC 7296 §2.4)"
        for old in others:
            old.close_now(f"replaced by a new IKE SA of {peer!r}: {why}", now)
            self._count("unique_replaced")

    def _init_request(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        try:
            msg = m.decode(data)
        except m.ParseError:
            self._count("dropped_malformed_init")
            return
        existing = self._init_index.get((msg.spi_i, src))
        if existing is not None:
            existing.receive(data, src, src_port, dst_port, now)  # retransmitted IKE_SA_INIT
            self._settle(now)
            return
        if not any(p.remote_addr in (None, src) for p in self.peers.values()):
            self._count("dropped_no_config")
            return
        half_open = sum(1 for sa in self.sas.values() if sa.state == "init_done")
        if half_open >= self.half_open_limit:
            self._count("dropped_half_open_limit")
            return
        if half_open >= self.cookie_threshold and not self.stateless.cookie_ok(msg, src, now):
            self._unattached.append(self.stateless.cookie(msg, src, src_port, dst_port, now))
            return
        candidates = self._candidates(msg, src)
        cfg = candidates[0]
        sa = IkeSa(cfg, initiator=False, rng=self.rng, now=now, remote=src, remote_port=src_port,
                   wallclock=self.wallclock, keypairs=self.keypairs)  # fmt: skip
        sa.local_port = dst_port
        sa.candidates = candidates
        if sa.respond_init(msg, now):
            self.sas[sa.spi_r] = sa
            self._init_index[(msg.spi_i, src)] = sa
            sa.on_output = self._wake
            self._wake(sa)
            self._settle(now)
        else:
            self._unattached += sa.datagrams()
            if sa.failure:
                self.failures.append((cfg.name, sa.failure))
            self._count("init_refused")

    def _candidates(self, msg: m.Message, src: str) -> list[PeerConfig]:
        """The connections an IKE_SA_INIT from ``src`` may belong to (profiles.py: IKE_AUTH picks one), the one
        to answer it with first: the peer's exact address before ``%any``, then the first whose proposals fit the
        offer (else the first: its NO_PROPOSAL_CHOSEN names both sides' proposals). Only connections on the same
        local address as that one stay candidates."""
        fits = sorted(
            (p for p in self.peers.values() if p.remote_addr in (None, src)), key=lambda p: p.remote_addr is None
        )
        offer = [p for pl in msg.payloads if isinstance(pl, m.SA) for p in pl.proposals]
        first = next((p for p in fits if props.select(p.proposals, offer, Protocol.IKE) is not None), None)
        if first is None:
            return fits[:1]
        return [first, *(p for p in fits if p is not first and p.local_addr == first.local_addr)]

    def datagrams(self) -> list[Datagram]:
        out = self._unattached + self._out
        self._unattached, self._out = [], []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    # --- the calls that act on one IKE SA (each ends with a settle step, like every input) -------------

    def delete(self, sa: IkeSa, now: float, cause: str = "local") -> None:
        sa.delete(now, cause)
        self._wake(sa)
        self._settle(now)

    def create_child(self, sa: IkeSa, name: str, now: float) -> bool:
        """Negotiate child ``name`` again in ``sa`` (IkeSa.create_child)."""
        done = sa.create_child(name, now)
        self._wake(sa)
        self._settle(now)
        return done

    def child_lifetime(self, spi: int, hard: bool, now: float) -> bool:
        """The datapath says a child SA (by either SPI) reached its soft (rekey now) or hard (delete it) lifetime.
        False if no IKE SA has it."""
        for sa in list(self.sas.values()):
            if sa.child_expired(spi, now) if hard else sa.rekey_now(now, spi):
                self._wake(sa)  # a soft limit only moves a timer
                self._settle(now)
                return True
        return False

    def rekey(self, sa: IkeSa, now: float, spi: int | None = None) -> bool:
        """Rekey ``sa`` now, or its child SA with SPI ``spi`` (either direction), as its lifetime would
        (``swanctl --rekey``). False if there is no such child or ``sa`` is not established."""
        done = sa.rekey_now(now, spi)
        if done:
            sa.handle_timer(now)  # the exchange starts at once if the window is free, else when it is
            self._wake(sa)
        self._settle(now)
        return done

    def inbound_seen(self, spis: Iterable[int], now: float) -> None:
        """The datapath saw traffic on these child SAs (by inbound SPI) since it last said: their IKE SAs' peers
        are alive (DPD, §2.4), and a rekey's held-back outbound SA may go (§2.8). Costs the SPIs given."""
        for spi in spis:
            sa = self._by_child.get(spi)
            if sa is not None and sa.state != "closed":
                sa.inbound_seen(spi, now)
        self._settle(now)

    # --- settling what the IKE SAs produced -----------------------------------------------------

    def _wake(self, sa: IkeSa) -> None:
        self._ready[id(sa)] = sa

    def _adopt(self, sa: IkeSa) -> None:
        """Demultiplex to the new IKE SAs of ``sa``'s rekeys from now on, under our SPI, before one of them takes
        over: in a simultaneous rekey (RFC 7296 §2.8.2) the peer may already use, or delete, the other one."""
        for new in sa.spawned():
            self.sas[new.spi_i if new.initiator else new.spi_r] = new
            new.on_output = self._wake
            self._wake(new)

    def _settle(self, now: float) -> None:
        """Move the output of every SA that has some to the manager's queues, act on its events, forget the
        SAs that closed, and refresh their timers; again for what that set off (bounded)."""
        for _ in range(32):
            if not self._ready:
                break
            ready, self._ready = list(self._ready.values()), {}
            for sa in ready:
                self._adopt(sa)
            # live IKE SAs first (see the module docstring)
            for sa in sorted(ready, key=lambda sa: sa.state == "closed"):
                for ev in (evs := sa.events()):
                    if isinstance(ev, ChildUp):
                        self.reqids.assign(ev)
                        self._by_child[ev.spi_in] = ev.sa
                    elif isinstance(ev, ChildDown):
                        self.reqids.release(ev.spi_in)
                        if self._by_child.get(ev.spi_in) is ev.sa:
                            del self._by_child[ev.spi_in]
                    elif isinstance(ev, IkeRekeyed):
                        self._by_child.update({c.spi_in: ev.new for c in ev.new.children})
                        # the new IKE SA (and a redundant one) got timers without output of their own
                        for other in (ev.new, ev.redundant):
                            if other is not None and other.state != "closed":
                                self._push_timer(other)
                    elif isinstance(ev, ReauthDue):
                        if ev.sa.cfg.name in self.peers:  # not if the connection was removed meanwhile
                            self.reauths.due(ev.sa, now)
                    elif isinstance(ev, IkeDown):
                        if ev.cause == "peer" and self._superseded(ev.sa):
                            ev.cause = "reauth"
                        self.reauths.closed(ev)
                self._events += evs
                self._out += sa.datagrams()
                if sa.state == "closed":
                    self._forget(sa)
                else:
                    self._push_timer(sa)
            self._events += self.reauths.progress(now)

    def _forget(self, sa: IkeSa) -> None:
        for key in [k for k, v in self.sas.items() if v is sa]:
            del self.sas[key]
        self._init_index.pop((sa.spi_i, sa.remote), None)
        self._when.pop(id(sa), None)

    def _push_timer(self, sa: IkeSa) -> None:
        t = sa.get_timer()
        if t is None:
            self._when.pop(id(sa), None)  # its heap entry, if any, is stale now
        elif self._when.get(id(sa)) != t:
            self._when[id(sa)] = t
            heapq.heappush(self._heap, (t, id(sa), sa))

    # --- the same peer ------------------------------------------------------------------------

    def _same_peer(self, sa: IkeSa) -> list[IkeSa]:
        """The other established IKE SAs of ``sa``'s connection with the same peer identity."""
        if sa.peer_id is None:
            return []
        return [o for o in self.sas.values() if o is not sa and o.established and o.cfg.name == sa.cfg.name
                and o.peer_id is not None and same_identity(o.peer_id, sa.peer_id)]  # fmt: skip

    def _superseded(self, sa: IkeSa) -> bool:
        """Another established IKE SA of the same connection and peer identity stays (the peer reauthenticated)."""
        return bool(self._same_peer(sa))

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap and self._when.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the SA's timer moved, or it is gone
        return heap[0][0] if heap else None

    def handle_timer(self, now: float) -> None:
        """Run the SAs whose timer is due (popped from the heap: the cost is theirs, not that of every SA)."""
        heap, due = self._heap, []
        while heap and heap[0][0] <= now:
            t, key, sa = heapq.heappop(heap)
            if self._when.get(key) == t:  # else stale: the SA's timer moved, or it is gone
                del self._when[key]
                due.append(sa)
        for sa in due:
            if sa.state != "closed":
                sa.handle_timer(now)
            self._wake(sa)  # settled, so its next timer goes into the heap
        self._settle(now)


__all__ = ["MAJOR_VERSION_BURST", "MAJOR_VERSION_RATE", "IkeManager"]
