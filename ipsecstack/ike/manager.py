"""Many IKE SAs behind one endpoint (sans-IO): demultiplexing by SPI, responder creation, initiation.

Theory of operation
-------------------
``receive(data, src, src_port, dst_port, now)`` routes a datagram: an IKE_SA_INIT request with a zero
responder SPI creates a responder SA (or, for a retransmission, reaches the one already created for
that initiator SPI and address); anything else is looked up by our own SPI (the initiator SPI for SAs
we started, the responder SPI for the others). Datagrams for no SA are dropped and counted; nothing an
unauthenticated peer sends creates more than one half-open SA per IKE_SA_INIT, and half-open SAs
beyond ``half_open_limit`` are refused (cookies come later: the request is dropped and counted).

Outputs are collected from every SA by ``datagrams()`` and ``events()``; closed SAs are forgotten
once their events have been collected. ``get_timer()`` is the earliest of the SAs' timers.
"""

from __future__ import annotations

from ipsecstack.entropy import Rng
from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange
from ipsecstack.ike.session import Datagram, Event, IkeRekeyed, IkeSa, PeerConfig

DEFAULT_HALF_OPEN_LIMIT = 256


class IkeManager:
    def __init__(self, peers: list[PeerConfig], rng: Rng, *, half_open_limit: int = DEFAULT_HALF_OPEN_LIMIT) -> None:
        self.peers = {p.name: p for p in peers}
        self.rng = rng
        self.half_open_limit = half_open_limit
        self.sas: dict[bytes, IkeSa] = {}
        self._init_index: dict[tuple[bytes, str], IkeSa] = {}
        self._stateless: list[Datagram] = []
        self._closed_events: list[Event] = []
        self.stats: dict[str, int] = {}
        self.failures: list[tuple[str, str]] = []

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def initiate(self, name: str, now: float) -> IkeSa:
        cfg = self.peers[name]
        sa = IkeSa(cfg, initiator=True, rng=self.rng, now=now)
        sa.start(now)
        self.sas[sa.spi_i] = sa
        return sa

    def by_name(self, name: str) -> list[IkeSa]:
        return [sa for sa in self.sas.values() if sa.cfg.name == name]

    def receive(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        try:
            spi_i, spi_r, _np, _v, exchange, flags, _mid, _len = m.decode_header(data)
        except m.ParseError:
            self._count("dropped_truncated")
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
        sa.receive(data, src, src_port, dst_port, now)

    def _init_request(self, data: bytes, src: str, src_port: int, dst_port: int, now: float) -> None:
        try:
            msg = m.decode(data)
        except m.ParseError:
            self._count("dropped_malformed_init")
            return
        existing = self._init_index.get((msg.spi_i, src))
        if existing is not None:
            existing.receive(data, src, src_port, dst_port, now)  # retransmitted IKE_SA_INIT
            return
        cfg = next((p for p in self.peers.values() if p.remote_addr in (None, src)), None)
        if cfg is None:
            self._count("dropped_no_config")
            return
        if sum(1 for sa in self.sas.values() if sa.state == "init_done") >= self.half_open_limit:
            self._count("dropped_half_open_limit")
            return
        sa = IkeSa(cfg, initiator=False, rng=self.rng, now=now, remote=src, remote_port=src_port)
        sa.local_port = dst_port
        if sa.respond_init(msg, now):
            self.sas[sa.spi_r] = sa
            self._init_index[(msg.spi_i, src)] = sa
        else:
            self._stateless += sa.datagrams()
            if sa.failure:
                self.failures.append((cfg.name, sa.failure))
            self._count("init_refused")

    def datagrams(self) -> list[Datagram]:
        out, self._stateless = self._stateless, []
        for sa in self.sas.values():
            out += sa.datagrams()
        return out

    def events(self) -> list[Event]:
        out, self._closed_events = self._closed_events, []
        for key, sa in list(self.sas.items()):
            evs = sa.events()
            for ev in evs:
                if isinstance(ev, IkeRekeyed):
                    new = ev.new
                    self.sas[new.spi_i if new.initiator else new.spi_r] = new
            out += evs
            if sa.state == "closed":
                del self.sas[key]
                self._init_index.pop((sa.spi_i, sa.remote), None)
        return out

    def get_timer(self) -> float | None:
        times = [t for sa in self.sas.values() if (t := sa.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for sa in list(self.sas.values()):
            t = sa.get_timer()
            if t is not None and t <= now:
                sa.handle_timer(now)
