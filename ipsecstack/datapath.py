"""The sans-IO datapath: SPD + SAD + transforms over batches of packets.

Theory of operation
-------------------
``outbound(packets, now)`` takes plaintext IP packets from the inner side. For each, the selector
fields are read (``wire.ip.flow_of``) and the SPD-O is consulted (first match, flow-cached):
BYPASS sends it on unchanged, DISCARD drops it, PROTECT finds the outbound SA through the policy's
template and applies ESP/AH. A PROTECT policy with no SA yet produces one :class:`Acquire` for the
key manager (like xfrm's acquire) and drops the packet (``no_sa``); further packets for that
policy are dropped without a new acquire until ``acquire_timeout`` passes or an SA is installed.

``inbound(packets, now)`` takes IP packets from the outer side. ESP (protocol 50), AH (51) and
ESP-in-UDP (UDP to an encapsulation port, RFC 3948) are looked up in the SAD by SPI and unprotected;
IKE messages on the encapsulation port (non-ESP marker) are handed back in ``to_ike``; NAT keepalives
are dropped silently. After decapsulation the packet must match the SA's selectors or, when the SA
has none, the SPD-I policy that covers it must be a PROTECT policy bound to that SA (RFC 4301 §5.2).
Plaintext that matches an SPD-I PROTECT policy is dropped (``policy_requires_protection``).

The outer plane speaks datagrams where the kernel does (``wire.udp_encap``): with
``outbound(..., datagrams=True)`` ESP in UDP from the Python transforms comes out in ``to_peer`` as
ESP bytes with their destination and TOS for the UDP socket, and ``inbound(packets, now, datagrams)``
takes what the socket read as payloads with their endpoints; tunnel mode needs no outer header at all
(only its ECN bits), transport mode and native SAs get the IP packet rebuilt for them.

Nothing raises out of a batch call: each rejected packet is a ``(reason, packet)`` entry in
``dropped`` and a count in ``drops`` (and in the SA's ``drops`` when the SA is known). Lifetime
events (soft: rekey; hard: the SA was removed) come back in ``events``. Time passes only through
``now``; ``handle_timer(now)`` fires time-based lifetimes and ``get_timer()`` says when it is next due.

Path MTU (RFC 4301 §8): with ``link_mtu`` given (a callable: outer destination address -> MTU of the
link towards it, asked once per destination and cached), a protected packet longer than that MTU is
sent on as it is when it may be fragmented (IPv4 without DF: the kernel fragments the outer packet),
and otherwise (IPv4 with DF, any IPv6 packet) dropped (``pmtu_exceeded``) with an ICMP "fragmentation
needed" / ICMPv6 "packet too big" for the sender in ``to_local``, carrying the MTU less the SA's
worst-case overhead, so the sender's path MTU leaves room for ESP/AH.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from ipsecstack.errors import Dropped, Reason
from ipsecstack.sa import SAEvent, SecurityAssociation
from ipsecstack.sad import SAD
from ipsecstack.spd import SPD, Action, Policy
from ipsecstack.wire import icmp, ip
from ipsecstack.wire.outer import parse_outer
from ipsecstack.wire.udp_encap import (
    ENCAP_PORT,
    KIND_ESP,
    KIND_IKE,
    KIND_KEEPALIVE,
    UDP_HEADER_LEN,
    Datagram,
    OutDatagram,
    classify,
    to_ip_packet,
)
from ipsecstack.xform import ah as ah_xform
from ipsecstack.xform import esp as esp_xform
from ipsecstack.xform import protect

if TYPE_CHECKING:
    from ipsecstack.native.engine import Engine
    from ipsecstack.native.link import NativeLink

Flow = tuple[int, int, int, int, int, int]
DEFAULT_ACQUIRE_TIMEOUT: Final = 30.0
DISCARD_FLOW: Final = 0  # Datapath.decide_out: the flow is discarded (SPI 0 is reserved, RFC 4303 §2.1)


@dataclass(frozen=True, slots=True)
class Acquire:
    """A packet matched a PROTECT policy that has no SA: the key manager should negotiate one."""

    policy: Policy
    flow: Flow
    packet: bytes


class IkeDatagram(NamedTuple):
    """An IKE message that arrived on the encapsulation port (non-ESP marker stripped)."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    message: bytes


class Result:
    """What one batch call produced."""

    __slots__ = ("acquires", "dropped", "events", "to_ike", "to_inner", "to_local", "to_network", "to_peer")

    def __init__(self) -> None:
        self.to_network: list[bytes] = []
        self.to_peer: list[OutDatagram] = []  # ESP in UDP for the UDP socket (outbound(datagrams=True))
        self.to_local: list[bytes] = []  # ICMP errors for local senders (path MTU, RFC 4301 §8)
        self.to_inner: list[bytes] = []
        self.to_ike: list[IkeDatagram] = []
        self.dropped: list[tuple[str, bytes]] = []
        self.acquires: list[Acquire] = []
        self.events: list[SAEvent] = []


class Datapath:
    def __init__(
        self,
        spd: SPD | None = None,
        *,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        encap_ports: Iterable[int] = (ENCAP_PORT,),
        link_mtu: Callable[[str], int] | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.spd = spd if spd is not None else SPD()
        # the native engine, when given, does the ESP work of every SA it accepts (native/link.py)
        self.native: NativeLink | None = None
        if engine is not None:
            from ipsecstack.native.link import NativeLink

            self.native = NativeLink(engine)
        # called after every change of the SAD or the SPD (the forwarder's flow cache is flushed)
        self.on_change: list[Callable[[], None]] = []
        self.spd.listeners.append(self.changed)
        self.link_mtu = link_mtu
        self._mtus: dict[bytes, int] = {}
        self.sad = SAD()
        self.acquire_timeout = acquire_timeout
        self.encap_ports = frozenset(encap_ports)
        self.drops: dict[str, int] = {}
        self.out_packets = 0
        self.in_packets = 0
        self._acquiring: dict[Policy, float] = {}
        self._seen: dict[int, SecurityAssociation] = {}  # Python-engine SAs reported seen, until re-armed
        self._seen_new: list[int] = []  # ... not yet taken

    # --- SA management ---------------------------------------------------------------------------

    def install(self, sa: SecurityAssociation, now: float) -> None:
        """Add an SA to the SAD; its time lifetimes count from ``now``."""
        self.sad.add(sa)
        if sa.added_at is None:
            sa.added_at = now
        if self.native is not None:
            self.native.adopt(sa)
        if sa.direction == "out" and self._acquiring:
            for pol in list(self._acquiring):
                t = pol.template
                if t is not None and (t.spi == sa.spi or (t.reqid is not None and t.reqid == sa.reqid)):
                    del self._acquiring[pol]
        self.changed()

    def remove(self, sa: SecurityAssociation) -> None:
        self.sad.remove(sa)
        if self._seen.get(sa.spi) is sa:
            del self._seen[sa.spi]
            sa.seen = False  # installed again, it reports its first packet again
        if self.native is not None:
            self.native.release(sa)
        self.changed()

    def changed(self) -> None:
        """The SAD or the SPD changed: tell who caches decisions."""
        for hook in self.on_change:
            hook()

    def move_peer(self, sa: SecurityAssociation, tunnel_dst: str | None, encap_dport: int | None) -> None:
        """An outbound SA follows its peer to a new address or NAT port (RFC 7296 §2.23)."""
        sa.move_peer(tunnel_dst, encap_dport)
        if self.native is not None:
            self.native.move(sa)

    def expire(self, sa: SecurityAssociation, *, hard: bool) -> None:
        """The owner fires a time lifetime of ``sa`` now (its events come with the next batch or timer)."""
        was_soft, was_dead = sa.soft_fired, sa.dead
        if hard:
            sa.expire_hard("seconds")
        else:
            sa.expire_soft("seconds")
        if self.native is not None:
            self.native.sync_time(sa, was_soft, was_dead)

    def replay_top(self, sa: SecurityAssociation) -> int:
        """The highest authenticated sequence number of an inbound SA, wherever it runs."""
        if sa.native and self.native is not None:
            return self.native.replay_top(sa)
        return sa.replay.top

    @property
    def engine_name(self) -> str:
        return "python" if self.native is None else "native"

    def refresh(self, sa: SecurityAssociation | None = None) -> None:
        """Bring the counters of ``sa`` (default: every SA) held by the native engine up to date."""
        if self.native is not None:
            if sa is None:
                self.native.refresh()
            elif sa.native:
                self.native.refresh_sa(sa)

    def take_seen(self) -> list[int]:
        """Inbound SPIs whose SA accepted a packet since it was installed or re-armed (:meth:`rearm_seen`),
        each once, whichever engine holds it: what the IKE core needs for liveness (RFC 7296 §2.4) and for
        the §2.8 hold-back, at a cost per SA with traffic, never per packet or per installed SA."""
        out, self._seen_new = self._seen_new, []
        if self.native is not None:
            out += self.native.take_seen()  # as far as native_events read the engine's queue
        return out

    def rearm_seen(self, spis: Sequence[int]) -> None:
        """Report the next packet of each of these inbound SAs again (unknown SPIs are skipped)."""
        native: list[int] = []
        for spi in spis:
            sa = self._seen.pop(spi, None)
            if sa is not None:
                sa.seen = False
            else:
                native.append(spi)
        if native and self.native is not None:
            self.native.rearm(native)

    def _saw(self, sa: SecurityAssociation) -> None:
        sa.seen = True
        self._seen[sa.spi] = sa
        self._seen_new.append(sa.spi)

    def drop_totals(self) -> dict[str, int]:
        """Drops by reason: what the batch calls saw, plus what the native engine dropped on its own."""
        if self.native is None:
            return dict(self.drops)
        out = dict(self.drops)
        for reason, n in self.native.own_drops().items():
            out[reason] = out.get(reason, 0) + n
        return out

    def native_events(self) -> list[SAEvent]:
        """Lifetime events the native engine raised on its own (its threads); hard-expired SAs are removed."""
        events: list[SAEvent] = []
        if self.native is not None:
            for sa in self.native.events():
                events.extend(self._take_events(sa))
        return events

    def handle_timer(self, now: float) -> list[SAEvent]:
        """Fire time-based lifetimes due at ``now``; hard-expired SAs are removed."""
        events = self.native_events()
        native = self.native
        for sa in self.sad:
            was_soft, was_dead = sa.soft_fired, sa.dead
            sa.check_time(now)
            if native is not None and sa.native:
                native.sync_time(sa, was_soft, was_dead)
            if sa.pending:
                events.extend(self._take_events(sa))
        for pol, until in list(self._acquiring.items()):
            if until <= now:
                del self._acquiring[pol]
        return events

    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` has work, or ``None``."""
        best: float | None = None
        for sa in self.sad:
            for t in sa.deadlines():
                if t is not None and (best is None or t < best):
                    best = t
        return best

    def _take_events(self, sa: SecurityAssociation) -> list[SAEvent]:
        events = sa.take_events()
        if sa.dead:
            self.remove(sa)
        return events

    def _drop(self, res: Result, reason: str, pkt: bytes, sa: SecurityAssociation | None = None) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        res.dropped.append((reason, pkt))
        if sa is not None:
            sa.drops[reason] = sa.drops.get(reason, 0) + 1

    def _engine_drop(self, res: Result, reason: str, pkt: bytes, sa: SecurityAssociation) -> None:
        """The native engine refused ``pkt`` (and counted it): the datapath counts its own view too."""
        assert self.native is not None
        self.native.refused_by_engine(reason)
        self._drop(res, reason, pkt, sa)  # sa.drops: the mirror, until the next refresh sets it exactly

    def _engine_result(self, res: Result, r: bytes | str, pkt: bytes, sa: SecurityAssociation) -> bytes | None:
        """One packet's answer from the native engine: the bytes, or None once the drop is counted. The
        lifetime events it raised are taken at once, as the Python engine raises them."""
        if isinstance(r, str):
            self._engine_drop(res, r, pkt, sa)
        res.events.extend(self.native_events())
        return None if isinstance(r, str) else r

    # --- outbound --------------------------------------------------------------------------------

    def outbound(self, packets: Sequence[bytes], now: float, *, datagrams: bool = False) -> Result:
        """Protect a batch of inner packets. With ``datagrams`` (the outer port is a UDP socket), ESP in
        UDP from the Python transforms comes out as :class:`OutDatagram` in ``to_peer``, with no IP or
        UDP header for the socket to throw away; everything else is a whole packet in ``to_network``."""
        res = Result()
        lookup = self.spd.lookup
        lookup_sa = self.sad.lookup_outbound
        to_network = res.to_network
        to_peer = res.to_peer
        check_mtu = self.link_mtu is not None
        for pkt in packets:
            sa = None
            try:
                flow = ip.flow_of(pkt)
                pol = lookup("out", flow)
                if pol is None:
                    raise Dropped(Reason.NO_POLICY)
                action = pol.action
                if action is Action.PROTECT:
                    assert pol.template is not None
                    sa = lookup_sa(pol.template)
                    if sa is None:
                        self._acquire(res, pol, flow, pkt, now)
                        continue
                    if sa.native:
                        assert self.native is not None
                        sealed = self._engine_result(res, self.native.protect(sa, pkt), pkt, sa)
                        if sealed is None:
                            continue
                        out = sealed
                    elif datagrams and sa.udp_encap is not None:
                        d = esp_xform.protect_datagram(sa, pkt)
                        if check_mtu:
                            n = len(d.payload) + (28 if len(d.dst) == 4 else 48)
                            if n > 1280 and self._too_big(res, sa, pkt, n, d.dst):
                                raise Dropped(Reason.PMTU_EXCEEDED)
                        to_peer.append(d)
                        if sa.pending:
                            res.events.extend(self._take_events(sa))
                        continue
                    else:
                        out = protect(sa, pkt)
                    if check_mtu and len(out) > 1280:
                        dst = out[16:20] if out[0] >> 4 == 4 else out[24:40]
                        if self._too_big(res, sa, pkt, len(out), dst):
                            raise Dropped(Reason.PMTU_EXCEEDED)
                    to_network.append(out)
                    if sa.pending:
                        res.events.extend(self._take_events(sa))
                elif action is Action.BYPASS:
                    to_network.append(pkt)
                else:
                    raise Dropped(Reason.POLICY_DISCARD)
            except Dropped as e:
                self._drop(res, e.reason, pkt, sa)
                if sa is not None and sa.pending:
                    res.events.extend(self._take_events(sa))
        self.out_packets += len(packets)
        return res

    def _too_big(self, res: Result, sa: SecurityAssociation, pkt: bytes, length: int, dst: bytes) -> bool:
        """A protected packet of ``length`` bytes to ``dst`` exceeds the link MTU and may not be
        fragmented: tell the sender (RFC 4301 §8.1, §8.2)."""
        v4 = len(dst) == 4
        mtu = self._mtus.get(dst)
        if mtu is None:
            assert self.link_mtu is not None
            if len(self._mtus) >= 4096:
                self._mtus.clear()
            mtu = self._mtus[dst] = self.link_mtu(str(ipaddress.ip_address(dst)))
        if length <= mtu or (v4 and not pkt[6] & 0x40):
            return False  # fits, or the kernel fragments the outer packet (inner DF clear)
        room = mtu - sa.overhead
        inner_v4 = pkt[0] >> 4 == 4
        if inner_v4 == v4:
            # from this host: the outer source (the SA's tunnel source; transport mode: the packet's own)
            src = sa.outer_src if sa.tunnel and sa.outer_src is not None else (pkt[12:16] if v4 else pkt[8:24])
        else:  # a tunnel of the other family has no address of the inner one here (any source updates a PMTU)
            src = pkt[16:20] if inner_v4 else pkt[24:40]
        if inner_v4:
            res.to_local.append(icmp.frag_needed(pkt, max(room, 68), src))
        else:
            res.to_local.append(icmp.packet_too_big(pkt, max(room, 1280), src))
        return True

    def _acquire(self, res: Result, pol: Policy, flow: Flow, pkt: bytes, now: float) -> None:
        until = self._acquiring.get(pol)
        if until is None or now >= until:
            self._acquiring[pol] = now + self.acquire_timeout
            res.acquires.append(Acquire(pol, flow, pkt))
        self._drop(res, Reason.NO_SA, pkt)

    # --- inbound ---------------------------------------------------------------------------------

    def inbound(self, packets: Sequence[bytes], now: float, datagrams: Sequence[Datagram] = ()) -> Result:
        """Unprotect a batch from the outer side: whole IP packets, and datagrams from a UDP socket."""
        res = Result()
        if datagrams:
            self._inbound_datagrams(res, datagrams)
        lookup_sa = self.sad.lookup_inbound
        to_inner = res.to_inner
        for pkt in packets:
            sa = None
            try:
                version, off, nh_field, end = parse_outer(pkt)
                proto = pkt[nh_field]
                dst = pkt[16:20] if version == 4 else pkt[24:40]
                if proto == ip.PROTO_ESP:
                    if end - off < 8:
                        raise Dropped(Reason.TRUNCATED, "ESP header")
                    sa = lookup_sa(int.from_bytes(pkt[off : off + 4], "big"), ip.PROTO_ESP, dst)
                    if sa is None:
                        raise Dropped(Reason.UNKNOWN_SPI)
                    opened = self._open(res, sa, pkt, version, off, nh_field, end, False)
                    if opened is None:
                        continue
                    inner = opened
                elif (
                    proto == ip.PROTO_UDP
                    and end - off >= UDP_HEADER_LEN
                    and ((pkt[off + 2] << 8) | pkt[off + 3]) in self.encap_ports
                ):
                    body = pkt[off + UDP_HEADER_LEN : end]
                    kind = classify(body)
                    if kind == KIND_ESP:
                        sa = lookup_sa(int.from_bytes(body[:4], "big"), ip.PROTO_ESP, dst)
                        if sa is None:
                            raise Dropped(Reason.UNKNOWN_SPI)
                        opened = self._open(res, sa, pkt, version, off, nh_field, end, True)
                        if opened is None:
                            continue
                        inner = opened
                    elif kind == KIND_IKE:
                        src = pkt[12:16] if version == 4 else pkt[8:24]
                        sport = (pkt[off] << 8) | pkt[off + 1]
                        dport = (pkt[off + 2] << 8) | pkt[off + 3]
                        res.to_ike.append(IkeDatagram(src, dst, sport, dport, body[4:]))
                        continue
                    elif kind == KIND_KEEPALIVE:
                        raise Dropped(Reason.NAT_KEEPALIVE)
                    else:
                        raise Dropped(Reason.TRUNCATED, "ESP-in-UDP payload")
                elif proto == ip.PROTO_AH:
                    if end - off < 12:
                        raise Dropped(Reason.TRUNCATED, "AH header")
                    sa = lookup_sa(int.from_bytes(pkt[off + 4 : off + 8], "big"), ip.PROTO_AH, dst)
                    if sa is None:
                        raise Dropped(Reason.UNKNOWN_SPI)
                    inner = ah_xform.unprotect(sa, pkt)
                else:
                    self._plaintext_in(res, pkt)
                    continue
                if not sa.seen:
                    self._saw(sa)
                if not sa.selectors:
                    self._check_inbound_policy(sa, inner)
                to_inner.append(inner)
                if sa.pending:
                    res.events.extend(self._take_events(sa))
            except Dropped as e:
                self._drop(res, e.reason, pkt, sa)
                if sa is not None and sa.pending:
                    res.events.extend(self._take_events(sa))
        self.in_packets += len(packets)
        return res

    def _inbound_datagrams(self, res: Result, datagrams: Sequence[Datagram]) -> None:
        """The UDP socket's datagrams (RFC 3948 §2): ESP is unprotected without an IP header rebuilt for it
        (tunnel mode, Python transforms), IKE goes to ``to_ike``, keepalives are dropped silently."""
        lookup_sa = self.sad.lookup_inbound
        to_inner = res.to_inner
        for d in datagrams:  # from the socket bound to the encapsulation port: no port to check
            sa = None
            body = d.payload
            try:
                kind = classify(body)
                if kind == KIND_ESP:
                    sa = lookup_sa(int.from_bytes(body[:4], "big"), ip.PROTO_ESP, d.dst)
                    if sa is None:
                        raise Dropped(Reason.UNKNOWN_SPI)
                    if sa.native:
                        assert self.native is not None
                        pkt = to_ip_packet(d)
                        opened = self._engine_result(res, self.native.unprotect(pkt), pkt, sa)
                        if opened is None:
                            continue
                        inner = opened
                    else:
                        inner = esp_xform.unprotect_datagram(sa, d)
                    if not sa.seen:
                        self._saw(sa)
                    if not sa.selectors:
                        self._check_inbound_policy(sa, inner)
                    to_inner.append(inner)
                    if sa.pending:
                        res.events.extend(self._take_events(sa))
                elif kind == KIND_IKE:
                    res.to_ike.append(IkeDatagram(d.src, d.dst, d.sport, d.dport, bytes(body[4:])))
                elif kind == KIND_KEEPALIVE:
                    raise Dropped(Reason.NAT_KEEPALIVE)
                else:
                    raise Dropped(Reason.TRUNCATED, "ESP-in-UDP payload")
            except Dropped as e:
                self._drop(res, e.reason, bytes(body), sa)
                if sa is not None and sa.pending:
                    res.events.extend(self._take_events(sa))
        self.in_packets += len(datagrams)

    # --- the native forwarder's upcalls (runtime/fastpath.py) ------------------------------------

    def decide_out(self, pkt: bytes) -> int | None:
        """What the native forwarder may do with ``pkt``'s whole flow without asking again.

        The SPI of the native outbound SA that protects it, ``DISCARD_FLOW`` when policy discards it,
        or ``None`` when every packet of the flow must come here (BYPASS, no SA yet, an SA on the
        Python transforms, a packet whose selectors cannot be read). Valid until the next ``changed``.
        """
        try:
            pol = self.spd.lookup("out", ip.flow_of(pkt))
        except Dropped:
            return None
        if pol is None or pol.action is Action.BYPASS:
            return None
        if pol.action is not Action.PROTECT:
            return DISCARD_FLOW
        assert pol.template is not None
        sa = self.sad.lookup_outbound(pol.template)
        return sa.spi if sa is not None and sa.native and not sa.dead else None

    def inbound_decrypted(self, items: Sequence[tuple[int, bytes]], now: float) -> tuple[Result, list[int]]:
        """Inner packets the native forwarder decrypted, by SPI: the inbound policy check (RFC 4301 §5.2).

        Returns the result (``to_inner``: the packets that passed) and, per item, the index into
        ``items`` of those whose flow the forwarder may now deliver on its own (``Engine.learn_in``).
        """
        res = Result()
        ok: list[int] = []
        native = self.native
        for i, (spi, inner) in enumerate(items):
            sa = native.sas.get(("in", spi)) if native is not None else None
            try:
                if sa is None:
                    raise Dropped(Reason.UNKNOWN_SPI, "the SA left while its packet was on its way")
                if not sa.selectors:
                    self._check_inbound_policy(sa, inner)
            except Dropped as e:
                self._drop(res, e.reason, inner, sa)
                continue
            res.to_inner.append(inner)
            ok.append(i)
        self.in_packets += len(items)
        return res, ok

    def _open(self, res: Result, sa: SecurityAssociation, pkt: bytes, version: int, off: int, nh_field: int,
              end: int, udp: bool) -> bytes | None:  # fmt: skip
        """Unprotect ESP (in UDP when ``udp``) with whichever engine holds ``sa``; None: dropped by the engine."""
        if sa.native:
            assert self.native is not None
            return self._engine_result(res, self.native.unprotect(pkt), pkt, sa)
        return esp_xform.unprotect_located(sa, pkt, version, off, nh_field, end, udp)

    def _plaintext_in(self, res: Result, pkt: bytes) -> None:
        """Unprotected traffic from the outer side: allowed only where SPD-I says BYPASS."""
        pol = self.spd.lookup("in", ip.flow_of(pkt))
        if pol is None:
            raise Dropped(Reason.NO_POLICY)
        if pol.action is Action.BYPASS:
            res.to_inner.append(pkt)
        elif pol.action is Action.PROTECT:
            raise Dropped(Reason.POLICY_REQUIRES_PROTECTION)
        else:
            raise Dropped(Reason.POLICY_DISCARD)

    def _check_inbound_policy(self, sa: SecurityAssociation, inner: bytes) -> None:
        """RFC 4301 §5.2: the decapsulated packet must be one this SA may carry."""
        pol = self.spd.lookup("in", ip.flow_of(inner))
        if pol is None:
            return  # an SA without selectors and no SPD-I entry: the SA's selectors are "any"
        t = pol.template
        if (
            pol.action is not Action.PROTECT
            or t is None
            or t.protocol != sa.protocol
            or not (t.spi == sa.spi or (t.reqid is not None and t.reqid == sa.reqid))
        ):
            raise Dropped(Reason.POLICY_MISMATCH, f"SPD-I entry {pol.name or pol.selector} does not allow {sa!r}")
