"""Datapath self-check: two manually keyed peers exchange traffic through the sans-IO datapath.

This is what ``ipsecstack selfcheck`` runs (and, until the IKEv2 demo exists, ``ipsecstack demo``):
it builds gateway A and gateway B with one ESP SA in each direction, SPD policies on both sides,
pushes ICMP and TCP packets from each side's protected network to the other, replays a captured
packet and tampers with another to show both being refused, and prints what happened. Exit status 0
means every packet that should arrive arrived byte for byte and every bad one was refused with the
expected reason.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Literal

from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template
from ipsecstack.errors import Reason
from ipsecstack.wire import ip


def _ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    import ipaddress

    return ip.build_ipv4(
        0, 20 + len(payload), ident, True, 64, proto,
        ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
    ) + payload  # fmt: skip


def _icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    csum = ip.internet_checksum(body)
    return body[:2] + struct.pack("!H", csum) + body[4:]


def _tcp(sport: int, dport: int, seq: int, data: bytes) -> bytes:
    # checksum left zero: the self-check compares bytes, no TCP stack reads these
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0) + data


def _fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def run(
    transform: str = "aes128gcm16", mode: str = "tunnel", out: Callable[[str], None] = print, count: int = 200
) -> int:
    from ipsecstack.crypto.registry import parse_esp_transform

    suite = parse_esp_transform(transform)
    k_ab = os.urandom(suite.key_len)
    k_ba = os.urandom(suite.key_len)
    gw_a, gw_b = "192.0.2.1", "192.0.2.2"
    net_a, net_b = "10.1.0.0/16", "10.2.0.0/16"
    host_a, host_b = "10.1.0.10", "10.2.0.20"
    if mode == "transport":
        host_a, host_b = gw_a, gw_b
        net_a, net_b = gw_a + "/32", gw_b + "/32"
    tm: Literal["tunnel", "transport"] = "tunnel" if mode == "tunnel" else "transport"

    def sa(spi: int, key: bytes, src: str, dst: str, direction: Literal["in", "out"]) -> SecurityAssociation:
        return SecurityAssociation(spi, "esp", tm, transform, key, tunnel_src=src, tunnel_dst=dst, direction=direction)

    a = Datapath()
    b = Datapath()
    now = time.monotonic()
    a.install(sa(0xA0B0, k_ab, gw_a, gw_b, "out"), now)
    b.install(sa(0xA0B0, k_ab, gw_a, gw_b, "in"), now)
    b.install(sa(0xB0A0, k_ba, gw_b, gw_a, "out"), now)
    a.install(sa(0xB0A0, k_ba, gw_b, gw_a, "in"), now)
    a.spd.add(Policy(Selector(net_a, net_b), Action.PROTECT, "out", Template("esp", tm, spi=0xA0B0, tunnel_dst=gw_b)))
    a.spd.add(Policy(Selector(net_b, net_a), Action.PROTECT, "in", Template("esp", tm, spi=0xB0A0)))
    b.spd.add(Policy(Selector(net_b, net_a), Action.PROTECT, "out", Template("esp", tm, spi=0xB0A0, tunnel_dst=gw_a)))
    b.spd.add(Policy(Selector(net_a, net_b), Action.PROTECT, "in", Template("esp", tm, spi=0xA0B0)))

    out(f"ipsecstack self-check: ESP {transform}, {mode} mode, manual keys")
    out(f"  A {gw_a} protects {net_a} -> {net_b} with SPI 0xa0b0 (key fp {_fingerprint(k_ab)})")
    out(f"  B {gw_b} protects {net_b} -> {net_a} with SPI 0xb0a0 (key fp {_fingerprint(k_ba)})")
    failures = 0
    pkts_ab = [_ipv4(host_a, host_b, 1, _icmp_echo(7, i, bytes(56)), i) for i in range(count // 2)]
    pkts_ab += [_ipv4(host_a, host_b, 6, _tcp(40000, 80, i * 1000, os.urandom(i % 1400)), i) for i in range(count // 2)]
    pkts_ba = [_ipv4(host_b, host_a, 6, _tcp(80, 40000, i * 1000, os.urandom(i % 1400)), i) for i in range(count)]
    t0 = time.perf_counter()
    wire_ab = a.outbound(pkts_ab, now)
    got_b = b.inbound(wire_ab.to_network, now)
    wire_ba = b.outbound(pkts_ba, now)
    got_a = a.inbound(wire_ba.to_network, now)
    dt = time.perf_counter() - t0
    ok_ab = got_b.to_inner == pkts_ab
    ok_ba = got_a.to_inner == pkts_ba
    nbytes = sum(map(len, wire_ab.to_network)) + sum(map(len, wire_ba.to_network))
    out(f"  A -> B: {len(pkts_ab)} packets protected, {len(got_b.to_inner)} delivered intact: {_ok(ok_ab)}")
    out(f"  B -> A: {len(pkts_ba)} packets protected, {len(got_a.to_inner)} delivered intact: {_ok(ok_ba)}")
    first = wire_ab.to_network[0]
    proto = "ESP-in-IPv4" if first[9] == 50 else f"IP protocol {first[9]}"
    out(f"  on the wire: {proto}, {nbytes} bytes in {len(wire_ab.to_network) + len(wire_ba.to_network)} packets")
    failures += (not ok_ab) + (not ok_ba)

    replay = b.inbound([wire_ab.to_network[-3]], now)
    ok_replay = [r for r, _ in replay.dropped] == [Reason.REPLAY]
    out(f"  replayed packet refused as {replay.dropped[0][0] if replay.dropped else 'NOT REFUSED'}: {_ok(ok_replay)}")
    tampered = bytearray(a.outbound([pkts_ab[0]], now).to_network[0])
    tampered[-20] ^= 0x01
    bad = b.inbound([bytes(tampered)], now)
    ok_icv = [r for r, _ in bad.dropped] == [Reason.BAD_ICV]
    out(f"  tampered packet refused as {bad.dropped[0][0] if bad.dropped else 'NOT REFUSED'}: {_ok(ok_icv)}")
    stray = _ipv4(host_a, host_b, 17, b"\x00" * 16)
    plain = b.inbound([stray], now)
    ok_policy = [r for r, _ in plain.dropped] == [Reason.POLICY_REQUIRES_PROTECTION]
    out(f"  plaintext where policy demands ESP refused: {_ok(ok_policy)}")
    failures += (not ok_replay) + (not ok_icv) + (not ok_policy)
    total = len(pkts_ab) + len(pkts_ba)
    out(f"  {total} packets protected and unprotected in {dt * 1000:.1f} ms ({total / dt:,.0f} packets/s)")
    out("self-check " + ("passed" if failures == 0 else f"FAILED ({failures} checks)"))
    return 0 if failures == 0 else 1


def _ok(flag: bool) -> str:
    return "ok" if flag else "FAILED"


if __name__ == "__main__":
    sys.exit(run())
