"""Shared pieces of the native-engine tests: skip marker, SA pairs in both engines, packets, a reference.

The reference for every comparison is the Python engine (ipsecstack/xform/esp.py), itself checked
against the RFC vectors and scapy. ``reference_unprotect`` runs it in the order the datapath does
(locate the ESP header, check it is there, find the SA by SPI, unprotect), which is the order the
native engine's ``unprotect`` follows.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.packet import Raw

from ipsecstack import Dropped, SecurityAssociation, native, seeded_rng
from ipsecstack.crypto.registry import parse_esp_transform
from ipsecstack.xform import esp as esp_xform

needs_native = pytest.mark.skipif(not native.available, reason=f"native engine not built: {native.why_not}")

#: every ESP transform of the registry that the native engine implements
TRANSFORMS = [
    "aes128gcm16", "aes192gcm16", "aes256gcm16", "chacha20poly1305",
    "aes128-sha256", "aes128-sha384", "aes128-sha512", "aes192-sha256", "aes192-sha384", "aes192-sha512",
    "aes256-sha256", "aes256-sha384", "aes256-sha512", "null-sha256", "null-sha384", "null-sha512",
]  # fmt: skip
SPI = 0x1234
# ESN runs start just past a 2^32 boundary so the high half is non-zero in the ICV/AAD.
ESN_START = (1 << 32) + 5
GW = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}
HOSTS = {4: ("10.1.0.10", "10.2.0.20"), 6: ("fd00:1::10", "fd00:2::20")}
#: inner UDP payload sizes: every residue modulo 16, around the usual MTUs, up to 1500
SIZES = [*range(18), 31, 32, 33, 63, 64, 100, 255, 256, 511, 512, 1000, 1023, 1400, 1443, 1452, 1472, 1480, 1499, 1500]


def key_for(transform: str, seed: int = 1) -> bytes:
    return seeded_rng(seed)(parse_esp_transform(transform).key_len)


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


@dataclass
class Pair:
    """One SA in both engines, both directions: Python tx/rx and a native engine holding out + in."""

    tx: SecurityAssociation
    rx: SecurityAssociation
    engine: Any  # ipsecstack.native.Engine (typed Any: the module imports without the extension)
    rng_seed: int


def make_pair(
    transform: str,
    mode: str = "tunnel",
    *,
    outer: int = 4,
    esn: bool = False,
    encap: tuple[int, int] | None = None,
    rng_seed: int = 7,
    key: bytes | None = None,
    tx_seq: int | None = None,
    rx_top: int | None = None,
    **kw: Any,
) -> Pair:
    """Python SAs and the same SAs installed in a fresh native engine (the CBC IV seeds shared)."""
    key = key if key is not None else key_for(transform)
    src, dst = GW[outer]
    opts: dict[str, Any] = dict(esn=esn, udp_encap=encap, **kw)
    if mode == "tunnel":
        opts.update(tunnel_src=src, tunnel_dst=dst)
    tx = SecurityAssociation(SPI, "esp", mode, transform, key, direction="out", rng=seeded_rng(rng_seed), **opts)  # type: ignore[arg-type]
    rx = SecurityAssociation(SPI, "esp", mode, transform, key, direction="in", **opts)  # type: ignore[arg-type]
    if esn and tx_seq is None:
        tx_seq, rx_top = ESN_START - 1, ESN_START - 3
    if tx_seq is not None:
        tx.seq = tx_seq
    if rx_top is not None:
        rx.replay.top = rx_top
    eng = native.Engine()
    eng.install_sa(tx, rng=seeded_rng(rng_seed))
    eng.install_sa(rx)
    return Pair(tx, rx, eng, rng_seed)


def reference_unprotect(sas: Mapping[int, SecurityAssociation], pkt: bytes) -> bytes | str:
    """The Python engine on one received packet, in the datapath's order: inner packet or drop reason."""
    try:
        version, off, nh_field, end, udp = esp_xform.locate(pkt)
        esp_off = off + 8 if udp else off
        if end - esp_off < 8:
            return "truncated"
        sa = sas.get(int.from_bytes(pkt[esp_off : esp_off + 4], "big"))
        if sa is None:
            return "unknown_spi"
        return esp_xform.unprotect_located(sa, pkt, version, off, nh_field, end, udp)
    except Dropped as e:
        return e.reason


def reference_protect(sa: SecurityAssociation, pkt: bytes) -> bytes | str:
    try:
        return esp_xform.protect(sa, pkt)
    except Dropped as e:
        return e.reason


# --- inner packets (scapy builds them, with correct checksums) ------------------------------------


def _ip(version: int, src: str, dst: str, tos: int, df: bool) -> Any:
    if version == 4:
        return IP(src=src, dst=dst, tos=tos, flags="DF" if df else 0, id=7)
    return IPv6(src=src, dst=dst, tc=tos)


@functools.cache
def udp_packet(version: int, size: int, tos: int = 0, df: bool = False, transport: bool = False) -> bytes:
    src, dst = GW[version] if transport else HOSTS[version]
    return bytes(_ip(version, src, dst, tos, df) / UDP(sport=5000, dport=53) / Raw((bytes(range(251)) * 7)[:size]))


@functools.cache
def other_packets(version: int, transport: bool = False) -> tuple[bytes, ...]:
    """TCP, ICMP echo, UDP without checksum (IPv4) or with extension headers (IPv6)."""
    src, dst = GW[version] if transport else HOSTS[version]
    base = _ip(version, src, dst, 0xB8 | 1, True)
    pkts = [bytes(base / TCP(sport=40000, dport=443, flags="PA") / Raw(b"t" * 300))]
    if version == 4:
        pkts.append(bytes(base / ICMP(type=8, id=3, seq=9) / Raw(b"ping" * 14)))
        pkts.append(bytes(_ip(4, src, dst, 2, False) / UDP(sport=1, dport=2, chksum=0) / Raw(b"z" * 33)))
    else:
        pkts.append(bytes(base / ICMPv6EchoRequest(id=3, seq=9, data=b"ping" * 14)))
        pkts.append(bytes(base / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=443) / Raw(b"e" * 27)))
        routed = base / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(addresses=[dst]) / UDP(sport=9, dport=7)
        pkts.append(bytes(routed / Raw(b"r" * 5)))
    return tuple(pkts)


def batch_for(version: int, transport: bool) -> list[bytes]:
    """UDP packets of every size in SIZES (with varied DSCP/ECN and DF) and the other protocols."""
    out = [udp_packet(version, s, tos=(s * 4 + s % 4) & 0xFF, df=bool(s & 1), transport=transport) for s in SIZES]
    return out + list(other_packets(version, transport))
