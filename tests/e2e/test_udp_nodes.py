"""Two Nodes whose outer plane is a real UDP socket on loopback: the datagram path end to end (no root)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from backends.memory import MemoryLink
from backends.udp import UdpEncapPort
from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template
from ipsecstack.datapath import IkeDatagram
from ipsecstack.runtime.node import Node
from tests.packets import tcp4, udp4

LOOP = "127.0.0.1"
KEY_AB, KEY_BA = bytes(range(20)), bytes(range(20, 40))


def _datapath(local: str, remote: str, spi_out: int, spi_in: int, k_out: bytes, k_in: bytes,
              ports: tuple[int, int]) -> Datapath:  # fmt: skip
    dp = Datapath()
    dp.spd.add(Policy(Selector(local, remote), Action.PROTECT, "out", Template(reqid=1)))
    dp.spd.add(Policy(Selector(remote, local), Action.PROTECT, "in", Template(reqid=1)))
    for spi, direction, key in ((spi_out, "out", k_out), (spi_in, "in", k_in)):
        dp.install(SecurityAssociation(spi, "esp", "tunnel", "aes128gcm16", key, direction=direction, reqid=1,
                                       tunnel_src=LOOP, tunnel_dst=LOOP, udp_encap=ports), 0.0)  # fmt: skip
    return dp


async def _run(offloads: bool, n: int) -> tuple[list[bytes], list[bytes], list[IkeDatagram], UdpEncapPort]:
    ua, ub = UdpEncapPort(LOOP, 0, offloads=offloads), UdpEncapPort(LOOP, 0, offloads=offloads)
    app_a, app_b = MemoryLink(names=("app-a", "node-a")), MemoryLink(names=("node-b", "app-b"))
    a = Node(_datapath("10.1.0.0/16", "10.2.0.0/16", 0x1A, 0x1B, KEY_AB, KEY_BA, (ua.port, ub.port)),
             app_a.b, ua, name="a", batch_size=64)  # fmt: skip
    b = Node(_datapath("10.2.0.0/16", "10.1.0.0/16", 0x1B, 0x1A, KEY_BA, KEY_AB, (ub.port, ua.port)),
             app_b.a, ub, name="b", batch_size=64)  # fmt: skip
    ike: list[IkeDatagram] = []
    b.on_ike = ike.append
    a.start()
    b.start()
    try:
        sent = [tcp4(size=1000, sport=1000 + i % 3) for i in range(n)] + [udp4(payload=struct.pack("!I", n))]
        for i in range(0, len(sent), 32):
            app_a.a.write_batch(sent[i : i + 32])
            await asyncio.sleep(0)
        assert ua.send_ike(b"an IKE message", LOOP, ub.port)
        reply = udp4(src="10.2.0.20", dst="10.1.0.10", payload=b"back")
        app_b.b.write_batch([reply])
        got: list[bytes] = []
        for _ in range(300):  # bounded: at most ~3 s
            await asyncio.sleep(0.01)
            got += app_b.b.drain()
            if len(got) >= len(sent) and ike and app_a.a.pending:
                break
        back = app_a.a.drain()
    finally:
        a.stop()
        b.stop()
    assert back == [reply]
    return sent, got, ike, ub


@pytest.mark.parametrize("offloads", [False, True], ids=["plain", "gso-gro"])
def test_tunnel_over_a_udp_socket_carries_datagrams_both_ways(offloads: bool) -> None:
    sent, got, ike, ub = asyncio.run(_run(offloads, 200))
    assert got == sent  # in order, byte for byte
    assert [(i.message, i.dport) for i in ike] == [(b"an IKE message", ub.port)]
    assert ub.stats.rx_packets == len(sent) + 1
    if offloads and ub.gro:
        assert ub.stats.rx_super >= 1  # runs of same-size datagrams came as one buffer
