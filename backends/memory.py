"""In-memory packet links for tests, the demo and benchmarks: no kernel, seeded impairments.

Theory of operation
-------------------
A :class:`MemoryLink` joins two :class:`MemoryPort` ends. Writing a batch on one end runs each
packet through the impairments, in this order, with one seeded ``random.Random`` per link (so a
run is reproducible): loss (dropped), duplication (sent twice), reordering (held back and sent
after the next packet, or flushed on a short timer), delay (delivered by ``loop.call_later``).
Delivered packets land in the peer's bounded receive queue (``capacity``; overflow is dropped and
counted, never grown) and the peer's readiness callback is scheduled once per wake-up, so a node
drains them in batches exactly as it would a socket.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Sequence

from ipsecstack.runtime.io import PortStats

REORDER_FLUSH = 0.002


class MemoryPort:
    def __init__(self, link: MemoryLink, name: str, mtu: int, capacity: int) -> None:
        self.name = name
        self.mtu = mtu
        self.stats = PortStats()
        self.rx_overflow = 0
        self._link = link
        self._rx: deque[bytes] = deque()
        self._capacity = capacity
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cb: Callable[[], None] | None = None
        self._scheduled = False
        self._held: bytes | None = None
        self._closed = False
        self.peer: MemoryPort | None = None

    # PacketPort ------------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        self._loop = loop
        self._cb = on_readable
        if self._rx:
            self._wake()

    def read_batch(self, limit: int) -> list[bytes]:
        rx = self._rx
        n = min(limit, len(rx))
        out = [rx.popleft() for _ in range(n)]
        self.stats.rx_packets += n
        self.stats.rx_bytes += sum(map(len, out))
        return out

    def write_batch(self, packets: Sequence[bytes]) -> int:
        if self._closed or self.peer is None:
            self.stats.tx_dropped += len(packets)
            return 0
        link = self._link
        rng = link.rng
        sent = 0
        for pkt in packets:
            self.stats.tx_packets += 1
            self.stats.tx_bytes += len(pkt)
            if link.loss and rng.random() < link.loss:
                link.lost += 1
                continue
            copies = 2 if link.duplicate and rng.random() < link.duplicate else 1
            link.duplicated += copies - 1
            for _ in range(copies):
                if link.reorder and self._held is None and rng.random() < link.reorder:
                    self._held = bytes(pkt)
                    link.reordered += 1
                    if self._loop is not None:
                        self._loop.call_later(REORDER_FLUSH, self._flush_held)
                    continue
                self._send(bytes(pkt))
                if self._held is not None:
                    held, self._held = self._held, None
                    self._send(held)
            sent += 1
        return sent

    def close(self) -> None:
        self._closed = True
        self._cb = None
        self._rx.clear()

    # test / demo helpers ------------------------------------------------------------------------

    def inject(self, packets: Sequence[bytes]) -> None:
        """Deliver packets into this port's receive queue as if the peer had sent them."""
        for p in packets:
            self._deliver(p)

    def drain(self) -> list[bytes]:
        """Everything waiting in the receive queue (for code that does not attach)."""
        return self.read_batch(len(self._rx))

    @property
    def pending(self) -> int:
        return len(self._rx)

    # internals ----------------------------------------------------------------------------------

    def _flush_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._send(held)

    def _send(self, pkt: bytes) -> None:
        peer = self.peer
        assert peer is not None
        delay = self._link.delay
        if delay and self._loop is not None:
            jitter = self._link.jitter
            d = delay + (self._link.rng.uniform(0, jitter) if jitter else 0.0)
            self._loop.call_later(d, peer._deliver, pkt)
        else:
            peer._deliver(pkt)

    def _deliver(self, pkt: bytes) -> None:
        if self._closed:
            return
        if len(self._rx) >= self._capacity:
            self.rx_overflow += 1
            return
        self._rx.append(pkt)
        self._wake()

    def _wake(self) -> None:
        if self._cb is None or self._scheduled or self._loop is None:
            return
        self._scheduled = True
        self._loop.call_soon(self._run_cb)

    def _run_cb(self) -> None:
        self._scheduled = False
        cb = self._cb
        if cb is not None and self._rx:
            cb()
            if self._rx:
                self._wake()


class MemoryLink:
    """Two connected ports, ``a`` and ``b``, with optional seeded impairments."""

    def __init__(
        self,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        mtu: int = 1500,
        capacity: int = 4096,
        names: tuple[str, str] = ("a", "b"),
    ) -> None:
        for label, p in (("loss", loss), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{label} = {p!r}: give a probability between 0 and 1")
        if delay < 0 or jitter < 0:
            raise ValueError("delay and jitter are seconds >= 0")
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self.a = MemoryPort(self, names[0], mtu, capacity)
        self.b = MemoryPort(self, names[1], mtu, capacity)
        self.a.peer = self.b
        self.b.peer = self.a
