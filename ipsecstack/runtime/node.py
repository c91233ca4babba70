"""A Node: one Datapath driven by asyncio between an inner and an outer packet port.

Theory of operation
-------------------
Two readiness callbacks, one per direction, and no per-packet awaits (DESIGN.md §4). When the inner
port is readable the node reads up to ``batch_size`` plaintext packets, runs ``Datapath.outbound``
on the batch with the current time, writes what comes out to the outer port, and hands drops,
acquires and lifetime events to their handlers. The outer port mirrors this with
``Datapath.inbound``. A full batch means more may be waiting, so the callback re-schedules itself
with ``call_soon`` (fairness between the directions) instead of looping without bound.

Exactly one timer is armed, at ``Datapath.get_timer()``; it runs ``handle_timer`` and re-arms.
Nothing queues between stages: a port that cannot take a packet drops and counts it.

With the native datapath on a TUN device and raw/UDP sockets, a :class:`Forwarding` (the native engine's
forwarder, runtime/fastpath.py) carries both directions in the engine's threads instead, and the Node
only hears of what they cannot decide alone; the timer, events and reporting stay here.

For NFQUEUE (a :class:`QueuePort`), each queued packet gets a verdict: the outbound queue's packets
are replaced by their protected form, the inbound queue's by the plaintext (transport mode on the
host's own traffic), and packets the datapath refuses are dropped; with the native datapath the
engine's threads answer the queues instead (runtime/fastpath_nfq.py), as on the TUN planes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ipsecstack.datapath import Acquire, Datapath, IkeDatagram, Result
from ipsecstack.errors import Reason
from ipsecstack.runtime.io import DatagramPort, PacketPort, QueuePort
from ipsecstack.runtime.logs import DropReporter
from ipsecstack.sa import SAEvent
from ipsecstack.wire.udp_encap import Datagram

DEFAULT_BATCH = 64


class Forwarding(Protocol):
    """Something that carries the inner and outer planes' packets instead of the Node (runtime/fastpath.py)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, object]: ...


class Node:
    def __init__(
        self,
        datapath: Datapath,
        inner: PacketPort | None = None,
        outer: PacketPort | None = None,
        *,
        queue_out: QueuePort | None = None,
        queue_in: QueuePort | None = None,
        batch_size: int = DEFAULT_BATCH,
        clock: Callable[[], float] = time.monotonic,
        name: str = "node",
        log: Any = None,
    ) -> None:
        if (inner is None) != (outer is None):
            raise ValueError("give both an inner and an outer port, or neither")
        if inner is None and queue_out is None and queue_in is None:
            raise ValueError("a node needs ports: inner+outer, or NFQUEUE queues")
        self.datapath = datapath
        self.inner = inner
        self.outer = outer
        self._dgram_outer = outer if isinstance(outer, DatagramPort) else None
        self.queue_out = queue_out
        self.queue_in = queue_in
        self.batch_size = batch_size
        self.clock = clock
        self.name = name
        self.log = log or structlog.get_logger("ipsecstack").bind(node=name)
        self.drops = DropReporter(self.log)
        self.on_event: Callable[[SAEvent], None] | None = None
        self.on_acquire: Callable[[Acquire], None] | None = None
        self.on_ike: Callable[[IkeDatagram], None] | None = None
        # inbound SPIs whose SA accepted traffic since the datapath last reported it (Datapath.take_seen)
        self.on_seen: Callable[[list[int]], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Event | None = None
        self._pending: set[str] = set()
        self.batches = 0
        self.on_start: list[Callable[[], None]] = []  # e.g. the IKE endpoint, after the ports attach
        self.on_stop: list[Callable[[], None]] = []  # run before the ports close
        self.traps: dict[tuple[str, str], int] = {}  # reqids of trap policies by (connection, child)
        self.control_task: Any = None
        self.on_reload: Callable[[], None] | None = None  # SIGHUP
        # outer ports beside the main planes, read only: IKE's NAT-T socket next to NFQUEUE (agent/services.py)
        self.side_ports: list[PacketPort] = []
        # where ICMP errors for local senders go (Result.to_local, path MTU): the inner port by default
        # (TUN: the kernel routes them to the sender), a raw socket to this host with NFQUEUE
        self.local_out: PacketPort | None = None
        # the native engine's forwarder, when it owns the TUN and outer fds (then the Node reads neither)
        self.forwarder: Forwarding | None = None
        # the TUN ring's length kept to a byte budget (backends/tun_queue.py), None when fixed or off
        self.tun_queue: Any = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Attach to the ports and begin processing (call from inside the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self.forwarder is not None:
            self.forwarder.start(self._loop)
        elif self.inner is not None and self.outer is not None:
            self.inner.attach(self._loop, self._inner_readable)
            self.outer.attach(self._loop, self._outer_readable)
        if self.queue_out is not None and self.forwarder is None:
            self.queue_out.attach(self._loop, self._queue_out_readable)
        if self.queue_in is not None and self.forwarder is None:
            self.queue_in.attach(self._loop, self._queue_in_readable)
        for port in self.side_ports:
            port.attach(self._loop, functools.partial(self._side_readable, port))
        self._arm_timer()
        self.log.info("node started", batch=self.batch_size, datapath=self.datapath.engine_name,
                      forwarder=self.forwarder is not None)  # fmt: skip
        for hook in self.on_start:
            hook()

    def stop(self) -> None:
        """Detach and close every port; idempotent."""
        hooks, self.on_stop = self.on_stop, []
        if self.forwarder is not None:
            hooks.insert(0, self.forwarder.stop)  # the engine's threads let go of the fds before they close
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for port in (self.inner, self.outer, self.queue_out, self.queue_in):
            if port is not None:
                with contextlib.suppress(Exception):
                    port.close()
        if self._stopped is not None and not self._stopped.is_set():
            self._stopped.set()
            self.log.info("node stopped", **self.counters())

    async def run_until_signal(self) -> None:
        """Start, then run until SIGINT/SIGTERM (or ``stop()``), then clean up."""
        self.start()
        loop = self._loop
        assert loop is not None and self._stopped is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        if self.on_reload is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.on_reload)
        try:
            await self._stopped.wait()
        finally:
            self.stop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    # --- the two directions ----------------------------------------------------------------------

    def _again(self, key: str, fn: Callable[[], None]) -> None:
        if key not in self._pending and self._loop is not None:
            self._pending.add(key)

            def run() -> None:
                self._pending.discard(key)
                fn()

            self._loop.call_soon(run)

    def _inner_readable(self) -> None:
        assert self.inner is not None and self.outer is not None
        pkts = self.inner.read_batch(self.batch_size)
        if not pkts:
            return
        dgram = self._dgram_outer
        res = self.datapath.outbound(pkts, self.clock(), datagrams=dgram is not None)
        if res.to_network:
            self.outer.write_batch(res.to_network)
        if res.to_peer:
            assert dgram is not None
            dgram.write_datagrams(res.to_peer)
        self._after(res, "out")
        if len(pkts) >= self.batch_size:
            self._again("inner", self._inner_readable)

    def _outer_readable(self) -> None:
        assert self.inner is not None and self.outer is not None
        dgrams, pkts = self._read_outer(self.outer, self._dgram_outer)
        n = len(dgrams) + len(pkts)
        if not n:
            return
        res = self.datapath.inbound(pkts, self.clock(), dgrams)
        if res.to_inner:
            self.inner.write_batch(res.to_inner)
        self._after(res, "in")
        if n >= self.batch_size:
            self._again("outer", self._outer_readable)

    def _read_outer(self, port: PacketPort, dgram: DatagramPort | None) -> tuple[list[Datagram], list[bytes]]:
        """One batch from an outer port: a UDP socket's as datagrams, no IP header rebuilt for them
        (``dgram``: the port itself when it is a :class:`DatagramPort`), anything else as packets."""
        if dgram is not None:
            return dgram.read_split(self.batch_size)
        return [], port.read_batch(self.batch_size)

    def _side_readable(self, port: PacketPort) -> None:
        """A side port (no inner plane behind it): IKE goes to ``on_ike``; plaintext has nowhere to go."""
        dgrams, pkts = self._read_outer(port, port if isinstance(port, DatagramPort) else None)
        n = len(dgrams) + len(pkts)
        if not n:
            return
        res = self.datapath.inbound(pkts, self.clock(), dgrams)
        if res.to_inner:
            # ESP in UDP that the NFQUEUE rules did not queue (a peer without a policy): counted, not delivered
            res.dropped.extend((Reason.NO_INNER_PLANE, p) for p in res.to_inner)
            drops = self.datapath.drops
            drops[Reason.NO_INNER_PLANE] = drops.get(Reason.NO_INNER_PLANE, 0) + len(res.to_inner)
        self._after(res, "in")
        if n >= self.batch_size:
            self._again(f"side{id(port)}", functools.partial(self._side_readable, port))

    def _queue_out_readable(self) -> None:
        assert self.queue_out is not None
        self._queue_round(self.queue_out, "out")

    def _queue_in_readable(self) -> None:
        assert self.queue_in is not None
        self._queue_round(self.queue_in, "in")

    def _queue_round(self, port: QueuePort, direction: str) -> None:
        held = port.read_batch(self.batch_size)
        if not held:
            return
        now = self.clock()
        replacements: list[bytes | None] = []
        results: list[Result] = []
        # one packet at a time: each queued packet needs its own verdict
        for qp in held:
            res = (self.datapath.outbound if direction == "out" else self.datapath.inbound)([qp.payload], now)
            out = res.to_network if direction == "out" else res.to_inner
            replacements.append(out[0] if out else None)
            results.append(res)
        port.verdicts(held, replacements)
        for res in results:
            self._after(res, direction)
        if len(held) >= self.batch_size:
            self._again("q" + direction, lambda: self._queue_round(port, direction))

    def _after(self, res: Result, direction: str) -> None:
        self.batches += 1
        if res.to_local:
            port = self.local_out or self.inner
            if port is not None:
                port.write_batch(res.to_local)
        if res.dropped:
            self.drops.report(direction, res.dropped)
        if res.events:
            for ev in res.events:
                self._event(ev)
            self._arm_timer()
        if res.acquires and self.on_acquire is not None:
            for acq in res.acquires:
                self.on_acquire(acq)
        if res.to_ike and self.on_ike is not None:
            for dgram in res.to_ike:
                self.on_ike(dgram)
        self.report_seen()

    def report_seen(self) -> None:
        """Hand ``on_seen`` the inbound SAs that saw traffic since they were re-armed (none: costs a call)."""
        seen = self.datapath.take_seen()
        if seen and self.on_seen is not None:
            self.on_seen(seen)

    def _event(self, ev: SAEvent) -> None:
        self.log.info("sa lifetime", kind=ev.kind, trigger=ev.trigger, spi=f"0x{ev.sa.spi:08x}", sa=ev.sa.name)
        if self.on_event is not None:
            self.on_event(ev)

    # --- timer -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.datapath.get_timer()
        if when is not None:
            delay = max(0.0, when - self.clock())
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for ev in self.datapath.handle_timer(self.clock()):
            self._event(ev)
        self.report_seen()
        self._arm_timer()

    def notify_sas_changed(self) -> None:
        """Call after installing or removing SAs so the lifetime timer is re-armed."""
        self._arm_timer()

    # --- reporting -------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        dp = self.datapath
        out: dict[str, Any] = {
            "datapath": dp.engine_name,
            "out_packets": dp.out_packets,
            "in_packets": dp.in_packets,
            "drops": dp.drop_totals(),
            "sas": len(dp.sad),
        }
        if dp.native is not None:
            # SAs the engine does not implement run on the Python transforms: say which and why
            out["python_sas"] = {f"0x{sa.spi:08x} {sa.direction}": why for sa, why in dp.native.refused.values()}
        if self.forwarder is not None:
            fwd = out["forwarder"] = self.forwarder.stats()
            # what the engine's threads carried without asking Python, on top of what Python carried
            for key in ("out_packets", "in_packets"):
                n = fwd.get(key)
                if isinstance(n, int):
                    out[key] += n
        if self.tun_queue is not None:
            out["tun_queue"] = self.tun_queue.stats()
        ports = (
            ("inner", self.inner),
            ("outer", self.outer),
            ("queue_out", self.queue_out),
            ("queue_in", self.queue_in),
        )
        for label, port in ports:
            stats = getattr(port, "stats", None)
            if stats is not None:
                out[label] = stats.as_dict()
        return out

    def sa_counters(self) -> list[dict[str, Any]]:
        self.datapath.refresh()
        return [
            {
                "name": sa.name,
                "spi": f"0x{sa.spi:08x}",
                "direction": sa.direction,
                "protocol": sa.protocol,
                "mode": sa.mode,
                "transform": sa.transform,
                "packets": sa.packets,
                "bytes": sa.bytes,
                "drops": dict(sa.drops),
                "engine": "native" if sa.native else "python",
            }
            for sa in self.datapath.sad
        ]
