"""Packet builders for tests (scapy is the independent reference; the package never imports it)."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.packet import Raw


def tcp4(
    src: str = "10.1.0.10", dst: str = "10.2.0.20", sport: int = 40000, dport: int = 80, size: int = 100, tos: int = 0
) -> bytes:
    return bytes(
        IP(src=src, dst=dst, tos=tos, flags="DF")
        / TCP(sport=sport, dport=dport)
        / Raw(bytes(range(256)) * (size // 256) + bytes(size % 256))
    )


def udp4(
    src: str = "10.1.0.10", dst: str = "10.2.0.20", sport: int = 5000, dport: int = 53, payload: bytes = b"q" * 20
) -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def icmp4(src: str = "10.1.0.10", dst: str = "10.2.0.20", seq: int = 1) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=8, id=7, seq=seq) / Raw(b"ping" * 14))


def udp6(
    src: str = "fd00:1::10",
    dst: str = "fd00:2::20",
    sport: int = 5000,
    dport: int = 53,
    payload: bytes = b"v6" * 30,
    tc: int = 0,
) -> bytes:
    return bytes(IPv6(src=src, dst=dst, tc=tc) / UDP(sport=sport, dport=dport) / Raw(payload))


def tcp6_ext(src: str = "fd00:1::10", dst: str = "fd00:2::20") -> bytes:
    """IPv6 with a hop-by-hop header before and a destination options header, then TCP."""
    return bytes(
        IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=443) / Raw(b"ext" * 9)
    )
