"""The daemon's half of the native forwarder (runtime/fastpath.py) against the real engine, without root.

Two Nodes in one asyncio loop, each a native Datapath with an SPD and tunnel-mode ESP-in-UDP SAs, a
socketpair end standing in for its TUN device and a UDP socket on 127.0.0.1 as its outer plane: the
engine's threads own both, and :class:`FastPath` answers their punts as the daemon does.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from backends.udp import UdpEncapPort
from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template, native
from ipsecstack.datapath import IkeDatagram
from ipsecstack.runtime.fastpath import FastPath
from ipsecstack.runtime.node import Node
from ipsecstack.wire.udp_encap import NON_ESP_MARKER
from tests.native.native_helpers import key_for
from tests.packets import tcp4, udp4

pytestmark = pytest.mark.skipif(not native.available, reason=f"native engine: {native.why_not}")

LOOP = "127.0.0.1"


class PairPort:
    """The Node's view of the socketpair 'TUN': Python writes punted packets' answers into it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        raise AssertionError("the engine owns the inner fd: the Node must not read it")

    def read_batch(self, limit: int) -> list[bytes]:
        raise AssertionError("the engine owns the inner fd")

    def write_batch(self, packets: Sequence[bytes]) -> int:
        for p in packets:
            self.sock.send(p)
        return len(packets)

    def close(self) -> None:
        pass


class Side:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dp = Datapath(engine=native.Engine(), encap_ports=(4500,))
        self.udp = UdpEncapPort(LOOP, 0)
        self.tun, self.app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        os.set_blocking(self.tun.fileno(), False)
        os.set_blocking(self.app.fileno(), False)
        self.node = Node(self.dp, PairPort(self.tun), self.udp, name=name)  # type: ignore[arg-type]
        self.fast = FastPath(self.node, self.dp.native.engine, self.tun.fileno(),  # type: ignore[union-attr]
                             [("udp4", self.udp.fileno())])  # fmt: skip
        self.node.forwarder = self.fast
        self.ike: list[IkeDatagram] = []
        self.acquires: list[Any] = []
        self.node.on_ike = self.ike.append
        self.node.on_acquire = self.acquires.append

    def received(self) -> list[bytes]:
        got: list[bytes] = []
        for _ in range(10000):
            try:
                got.append(self.app.recv(70000))
            except BlockingIOError:
                break
        return got


def _sa(spi: int, direction: str, ports: tuple[int, int]) -> SecurityAssociation:
    return SecurityAssociation(spi, "esp", "tunnel", "aes128gcm16", key_for("aes128gcm16", spi & 0xFF),
                               direction=direction, tunnel_src=LOOP, tunnel_dst=LOOP, udp_encap=ports,  # type: ignore[arg-type]
                               reqid=1)  # fmt: skip


@contextmanager
def sides() -> Iterator[tuple[Side, Side]]:
    a, b = Side("a"), Side("b")
    try:
        ab, ba = (a.udp.port, b.udp.port), (b.udp.port, a.udp.port)
        for s, lnet, rnet in ((a, "10.1.0.0/16", "10.2.0.0/16"), (b, "10.2.0.0/16", "10.1.0.0/16")):
            s.dp.encap_ports = frozenset({a.udp.port, b.udp.port})
            s.dp.spd.add(Policy(Selector(lnet, rnet), Action.PROTECT, "out", Template(reqid=1)))
            s.dp.spd.add(Policy(Selector(rnet, lnet), Action.PROTECT, "in", Template(reqid=1)))
        # flows to 10.9.0.0/16 are discarded by policy
        a.dp.spd.add(Policy(Selector("10.1.0.0/16", "10.9.0.0/16"), Action.DISCARD, "out"), 0)
        a.dp.install(_sa(0xAB, "out", ab), 0.0)
        b.dp.install(_sa(0xAB, "in", ab), 0.0)
        b.dp.install(_sa(0xBA, "out", ba), 0.0)
        a.dp.install(_sa(0xBA, "in", ba), 0.0)
        yield a, b
    finally:
        for s in (a, b):
            s.node.stop()
            s.app.close()
            s.tun.close()


async def _until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_punts_answered_then_flows_carried_by_the_engine() -> None:
    async def run() -> None:
        with sides() as (a, b):
            a.node.start()
            b.node.start()
            pkts = [tcp4(src="10.1.0.1", dst="10.2.0.1", sport=1000, dport=80, size=100 + i) for i in range(50)]
            a.app.send(pkts[0])  # the flow's first packet: Python decides (SPD), then teaches the engine
            got: list[bytes] = []
            await _until(lambda: bool(got.extend(b.received()) or got), "the first packet at B")
            for p in pkts[1:]:
                a.app.send(p)
            await _until(lambda: bool(got.extend(b.received()) or len(got) >= 50), "50 packets at B")
            assert got == pkts  # byte for byte, in order
            # each thread counts its round after its last write: wait for the counters, not only the packets
            await _until(lambda: a.fast.stats()["out_packets"] == 49 and b.fast.stats()["in_packets"] == 49,
                         "the rounds counted")  # fmt: skip
            fa, fb = a.fast.stats(), b.fast.stats()
            assert fa["punts_answered"] == {"out": 1, "in": 0, "outer": 0}, fa
            assert fb["punts_answered"] == {"out": 0, "in": 1, "outer": 0}, fb
            assert fa["out_packets"] == 49 and fb["in_packets"] == 49, (fa, fb)
            # the SA mirrors see every packet, whoever carried it
            a.dp.refresh()
            assert next(sa for sa in a.dp.sad if sa.direction == "out").packets == 50
            # status: the node's totals add what the threads carried to what Python carried
            assert a.node.counters()["out_packets"] == 50 and b.node.counters()["in_packets"] == 50

            # discard: the first packet of the flow is dropped by Python, the rest by the engine
            a.app.send(udp4(src="10.1.0.1", dst="10.9.0.1"))
            await _until(lambda: a.dp.drops.get("policy_discard") == 1, "the discard decided by Python")
            for _ in range(4):
                a.app.send(udp4(src="10.1.0.1", dst="10.9.0.1"))
            await _until(lambda: a.fast.stats()["drops"].get("policy_discard", 0) == 4, "discards in the engine")
            assert a.dp.drops.get("policy_discard") == 1 and a.fast.stats()["punts_answered"]["out"] == 2

            # IKE on the encapsulation port (non-ESP marker) reaches the IKE handler through an outer punt
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind((LOOP, 0))
            probe.sendto(NON_ESP_MARKER + b"\x11" * 40, (LOOP, b.udp.port))
            await _until(lambda: bool(b.ike), "IKE at B")
            assert b.ike[0].message == b"\x11" * 40 and b.ike[0].sport == probe.getsockname()[1]
            probe.close()

            # an SPD/SAD change flushes the caches: without its SA the flow comes back to Python (acquire)
            out_sa = next(sa for sa in a.dp.sad if sa.direction == "out")
            a.dp.remove(out_sa)
            a.app.send(pkts[1])
            await _until(lambda: bool(a.acquires), "an acquire")
            assert a.fast.stats()["punts_answered"]["out"] >= 2

    asyncio.run(run())
