"""The native forwarder's Python half: the engine's threads own the hot fds, Python answers what they ask.

Theory of operation
-------------------
With the native datapath on the TUN planes (the daemon's default where the extension is built), the
:class:`~ipsecstack.runtime.node.Node` does not read the TUN device nor the outer sockets itself: it hands
their descriptors to the engine (``Engine.fwd_start``), whose two threads move packets with the GIL released
(TUN -> flow cache -> ESP protect -> ``sendmmsg``; ``recvmmsg`` -> ESP unprotect -> inbound flow cache ->
TUN), the way the kernel's xfrm carries the packets strongSwan's charon negotiated. Python stays the control
plane and the source of truth (SPD, SAD, acquires, policy checks, IKE) and sees only what the engine
cannot decide alone, through a bounded queue whose eventfd this module watches:

- ``("out", pkt)``: a TUN packet whose flow has no cached decision. It takes the ordinary Python path
  (``Datapath.outbound``: SPD lookup, acquire, BYPASS, Python-only SAs, PMTU), goes out through the outer
  port, and then the flow's decision (``Datapath.decide_out``: a native SA's SPI, or discard) is taught to
  the engine (``learn_out``), so later packets of the flow never come here. Writing first and teaching
  after keeps the flow's packets in order.
- ``("in", spi, inner)``: a packet the engine decrypted and charged (replay window, counters, lifetimes)
  whose flow it does not yet know to be allowed: ``Datapath.inbound_decrypted`` runs the RFC 4301 §5.2
  inbound policy check, the packets that pass go to the TUN, and their flows are taught (``learn_in``).
- ``("outer", pkt)``: an outer datagram the engine does not handle (IKE on 4500 after the non-ESP marker,
  ESP for an SA on the Python transforms or an unknown SPI), rebuilt as the outer port would have read
  it: ``Datapath.inbound`` sorts it exactly as without the forwarder.

Every change of the SPD or SAD flushes both flow caches (``Datapath.on_change``), so no decision outlives
the state it was taken from. Lifetime and "seen" events the engine's threads raise wake the same eventfd and
reach the Node's handlers (``Datapath.native_events``, ``Node.report_seen``). A wake-up handles at most
``ROUNDS`` x ``batch`` punts and re-schedules itself when more wait, so the asyncio loop (IKE, control
socket) is never starved; the engine drops and counts what does not fit its queue. What the outer planes
carry that the engine does not read (AH on the raw socket) is still read by the Node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ipsecstack.datapath import DISCARD_FLOW, Datapath, Result

if TYPE_CHECKING:
    from ipsecstack.runtime.node import Node

ROUNDS = 8  # punt batches per wake-up before yielding to the loop
PROTO_ESP = 50

Buffer = bytes | bytearray | memoryview


class AuxPort(Protocol):
    """An outer port the engine shares: it reads the port's ESP, the Node the other protocols (AH on
    ``backends/rawsock.py``'s RawPort)."""

    @property
    def protocols(self) -> Sequence[int]: ...

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None], *,
               protocols: Iterable[int] | None = ...) -> None: ...  # fmt: skip

    def read_batch(self, limit: int) -> list[bytes]: ...


class PuntEngine(Protocol):
    """What the punt loop uses of ``ipsecstack.native.Engine``, whichever threads it runs."""

    def fwd_stop(self) -> None: ...

    def flush(self) -> None: ...

    def take_punts(self, max: int = ...) -> list[tuple[Any, ...]]: ...

    def fwd_stats(self) -> dict[str, object]: ...


class Forwarder(PuntEngine, Protocol):
    """The TUN forwarder's methods (native/fwd.h)."""

    def fwd_start(self, tun_fd: int, outer: Sequence[tuple[str, int]], *, batch: int = ..., tso: bool = ...,
                  coalesce: bool = ..., gso: bool = ..., gro: bool = ..., codel_target_us: int = ...,
                  codel_interval_us: int = ...) -> int: ...  # fmt: skip

    def learn_out(self, pkt: Buffer, spi: int | None) -> None: ...

    def learn_in(self, spi: int, inner: Buffer) -> None: ...


class PuntLoop:
    """The Python half of engine threads: start them, answer their punts from the loop, stop them.

    Subclasses start their threads (``_start_engine``, returning the engine's eventfd) and answer a
    batch of punts (``answer``); the wake-ups, their bound and the engine's lifetime events are here.
    """

    def __init__(self, node: Node, engine: PuntEngine, kinds: Sequence[str]) -> None:
        self.node = node
        self._engine = engine
        self.eventfd = -1
        self.wakeups = 0
        self.punts = dict.fromkeys(kinds, 0)  # answered, by kind
        self._loop: asyncio.AbstractEventLoop | None = None
        self._again = False

    def _start_engine(self) -> int:
        raise NotImplementedError

    def answer(self, punts: Sequence[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.eventfd = self._start_engine()
        self.node.datapath.on_change.append(self._engine.flush)
        loop.add_reader(self.eventfd, self._wake)

    def stop(self) -> None:
        """Stop the engine's threads (bounded, idempotent); the Node then closes the ports."""
        if self._loop is not None and self.eventfd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.eventfd)
        self._loop = None
        with contextlib.suppress(ValueError):
            self.node.datapath.on_change.remove(self._engine.flush)
        self._engine.fwd_stop()
        self.eventfd = -1  # the engine's own; fwd_stop closed it

    def stats(self) -> dict[str, object]:
        out = dict(self._engine.fwd_stats())
        out["punts_answered"] = dict(self.punts)
        out["wakeups"] = self.wakeups
        return out

    # --- punts -----------------------------------------------------------------------------------

    def _wake(self) -> None:
        # The eventfd is the engine's: take_punts resets it once the queue is empty and no lifetime event
        # waits (under the queue's lock, so no wake-up is lost); reading it here would lose the next one.
        self._again = False
        self.wakeups += 1
        node = self.node
        events = node.datapath.native_events()
        if events:
            for ev in events:
                node._event(ev)
            node._arm_timer()
        node.report_seen()
        limit = node.batch_size
        for _ in range(ROUNDS):
            punts = self._engine.take_punts(limit)
            if punts:
                self.answer(punts)
            if len(punts) < limit:
                break
        else:
            self._reschedule()

    def _reschedule(self) -> None:
        if not self._again and self._loop is not None:
            self._again = True
            self._loop.call_soon(self._wake_soon)

    def _wake_soon(self) -> None:
        if self._again and self._loop is not None:
            self._wake()


class FastPath(PuntLoop):
    """Starts the engine's forwarder on a Node's planes and answers its punts (see the module docstring)."""

    def __init__(self, node: Node, engine: Forwarder, tun_fd: int, fds: Sequence[tuple[str, int]],
                 python_raw: Sequence[AuxPort] = (), *, tso: bool = False,
                 udp_offloads: bool = False, codel_ms: tuple[float, float] = (0.0, 100.0)) -> None:  # fmt: skip
        super().__init__(node, engine, ("out", "in", "outer"))
        self.engine = engine
        self.tun_fd = tun_fd
        self.fds = list(fds)
        self.python_raw = list(python_raw)
        # measured (bench/README.md "native forwarder: what each technique gave"): TSO pays only with the
        # inbound coalescing, UDP GSO only with GRO on the other end; all four together quadruple TCP
        self.offloads = {"tso": tso, "coalesce": tso, "gso": udp_offloads, "gro": udp_offloads}
        # CoDel on the ESP receive queues (native/codel.c): (target, interval) in ms, target 0: off
        self.codel_us = (round(codel_ms[0] * 1000), round(codel_ms[1] * 1000))

    def _start_engine(self) -> int:
        target, interval = self.codel_us
        return self.engine.fwd_start(self.tun_fd, self.fds, batch=self.node.batch_size, **self.offloads,
                                     codel_target_us=target, codel_interval_us=interval)  # fmt: skip

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        super().start(loop)
        for port in self.python_raw:
            # AH (and any protocol but ESP) on the raw plane: read by the Node as before
            port.attach(loop, functools.partial(self._raw_readable, port),
                        protocols=[p for p in port.protocols if p != PROTO_ESP])  # fmt: skip

    def answer(self, punts: Sequence[tuple[Any, ...]]) -> None:
        """Handle one batch of punts: the Python datapath's answer, then what the engine may learn from it."""
        outs: list[bytes] = []
        ins: list[tuple[int, bytes]] = []
        outers: list[bytes] = []
        for p in punts:
            kind = p[0]
            if kind == "out":
                outs.append(p[1])
            elif kind == "in":
                ins.append((p[1], p[2]))
            else:
                outers.append(p[1])
        node = self.node
        dp: Datapath = node.datapath
        now = node.clock()
        if outs:
            self.punts["out"] += len(outs)
            self._outbound(dp, outs, now)
        if ins:
            self.punts["in"] += len(ins)
            res, ok = dp.inbound_decrypted(ins, now)
            self._deliver(res, "in")
            learn_in = self.engine.learn_in
            for i in ok:
                spi, inner = ins[i]
                learn_in(spi, inner)
        if outers:
            self.punts["outer"] += len(outers)
            self._deliver(dp.inbound(outers, now), "in")

    def _outbound(self, dp: Datapath, pkts: list[bytes], now: float) -> None:
        node = self.node
        assert node.outer is not None
        res = dp.outbound(pkts, now)
        if res.to_network:
            node.outer.write_batch(res.to_network)
        node._after(res, "out")
        learn_out = self.engine.learn_out
        decide = dp.decide_out
        for pkt in pkts:
            spi = decide(pkt)
            if spi is not None:
                learn_out(pkt, None if spi == DISCARD_FLOW else spi)

    def _raw_readable(self, port: AuxPort) -> None:
        node = self.node
        pkts = port.read_batch(node.batch_size)
        if pkts:
            self._deliver(node.datapath.inbound(pkts, node.clock()), "in")
        if len(pkts) >= node.batch_size and self._loop is not None:
            self._loop.call_soon(self._raw_readable, port)

    def _deliver(self, res: Result, direction: str) -> None:
        node = self.node
        assert node.inner is not None
        if res.to_inner:
            node.inner.write_batch(res.to_inner)
        node._after(res, direction)
