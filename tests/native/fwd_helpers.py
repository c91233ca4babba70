"""Shared pieces of the native forwarder's tests: two peers on loopback, no root needed.

Each :class:`Peer` is a native engine with a socketpair end standing in for its TUN device (one packet
per read/write, like a TUN fd) and a :class:`~backends.udp.UdpEncapPort` on 127.0.0.1 (an ephemeral port)
as its outer plane. :func:`peers` makes A and B with a pair of tunnel-mode ESP-in-UDP SAs (A->B and
B->A, aes128gcm16 unless told) and Python twins of the inbound SAs (the reference, ipsecstack.xform).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backends.udp import UdpEncapPort
from ipsecstack import SecurityAssociation, native
from tests.native.native_helpers import key_for

LOOP = "127.0.0.1"
SPI_AB = 0x0A0B0001
SPI_BA = 0x0B0A0002


@dataclass
class Peer:
    name: str
    engine: Any  # ipsecstack.native.Engine
    port: UdpEncapPort
    tun: socket.socket  # the engine's end
    app: socket.socket  # the test's end: what the kernel would write into / read from the TUN
    sas: dict[str, SecurityAssociation] = field(default_factory=dict)
    eventfd: int = -1

    def start(self, **kw: Any) -> int:
        self.eventfd = self.engine.fwd_start(self.tun.fileno(), [("udp4", self.port.fileno())], **kw)
        return self.eventfd

    def send_inner(self, pkt: bytes, n: int = 1) -> None:
        for _ in range(n):
            self.app.send(pkt)

    def recv_inner(self, timeout: float = 5.0) -> bytes | None:
        r, _, _ = select.select([self.app], [], [], timeout)
        return self.app.recv(70000) if r else None

    def close(self) -> None:
        self.engine.fwd_stop()
        self.port.close()
        self.tun.close()
        self.app.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` until true, bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def take(peer: Peer, n: int, timeout: float = 5.0) -> list[tuple[Any, ...]]:
    """Exactly ``n`` punts of ``peer`` (waiting for them, bounded); fails on more or fewer."""
    got: list[tuple[Any, ...]] = []

    def more() -> bool:
        got.extend(peer.engine.take_punts())
        return len(got) >= n

    wait_until(more, timeout, f"{n} punts on {peer.name} (got {len(got)})")
    time.sleep(0.02)
    got.extend(peer.engine.take_punts())
    assert len(got) == n, got
    return got


def _sa(spi: int, direction: str, transform: str, src: str, dst: str, encap: tuple[int, int],
        **kw: Any) -> SecurityAssociation:  # fmt: skip
    return SecurityAssociation(spi, "esp", "tunnel", transform, key_for(transform, spi & 0xFF), direction=direction,  # type: ignore[arg-type]
                               tunnel_src=src, tunnel_dst=dst, udp_encap=encap, **kw)  # fmt: skip


def make_peer(name: str) -> Peer:
    eng = native.Engine()
    port = UdpEncapPort(LOOP, 0)
    tun, app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (tun, app):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    os.set_blocking(tun.fileno(), False)
    return Peer(name, eng, port, tun, app)


@contextmanager
def peers(transform: str = "aes128gcm16", *, start: bool = True, out_kw: dict[str, Any] | None = None,
          **start_kw: Any) -> Iterator[tuple[Peer, Peer]]:  # fmt: skip
    """A and B with SAs A->B (SPI_AB) and B->A (SPI_BA); forwarders started unless ``start`` is False."""
    a, b = make_peer("A"), make_peer("B")
    try:
        ab = (a.port.port, b.port.port)
        ba = (b.port.port, a.port.port)
        a.sas["out"] = _sa(SPI_AB, "out", transform, LOOP, LOOP, ab, **(out_kw or {}))
        b.sas["in"] = _sa(SPI_AB, "in", transform, LOOP, LOOP, ab)
        b.sas["out"] = _sa(SPI_BA, "out", transform, LOOP, LOOP, ba)
        a.sas["in"] = _sa(SPI_BA, "in", transform, LOOP, LOOP, ba)
        for p in (a, b):
            p.engine.install_sa(p.sas["out"])
            p.engine.install_sa(p.sas["in"])
            if start:
                p.start(**start_kw)
        yield a, b
    finally:
        a.close()
        b.close()


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)
