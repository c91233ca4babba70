"""Wire codecs: checksums, header builders and flow extraction, checked against scapy."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from ipsecstack.wire import ah, esp, ip, udp_encap
from tests.packets import tcp6_ext


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=3000))
def test_internet_checksum_matches_scapy(data: bytes) -> None:
    assert ip.internet_checksum(data) == scapy_checksum(data)


def test_build_ipv4_is_valid() -> None:
    hdr = ip.build_ipv4(0xB8, 60, 0x1234, True, 64, 50, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    pkt = IP(hdr + bytes(40))
    assert pkt.tos == 0xB8 and pkt.len == 60 and pkt.id == 0x1234 and pkt.flags == "DF"
    assert pkt.ttl == 64 and pkt.proto == 50 and pkt.src == "192.0.2.1" and pkt.dst == "192.0.2.2"
    recomputed = IP(bytes(pkt.__class__(src=pkt.src, dst=pkt.dst, tos=0xB8, len=60, id=0x1234, flags="DF", ttl=64,
                                        proto=50) / Raw(bytes(40))))  # fmt: skip
    assert pkt.chksum == recomputed.chksum


def test_build_ipv6() -> None:
    src, dst = ipaddress.ip_address("2001:db8::1").packed, ipaddress.ip_address("2001:db8::2").packed
    pkt = IPv6(ip.build_ipv6(0x2E, 0xABCDE, 8, 17, 33, src, dst) + bytes(8))
    assert (pkt.tc, pkt.fl, pkt.plen, pkt.nh, pkt.hlim) == (0x2E, 0xABCDE, 8, 17, 33)


def test_flow_of_ipv4_and_ipv6_extension_headers() -> None:
    v4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1234, dport=53))
    assert ip.flow_of(v4) == (4, 0x0A000001, 0x0A000002, 17, 1234, 53)
    v6 = tcp6_ext()
    version, src, dst, proto, sport, dport = ip.flow_of(v6)
    assert dst == int(ipaddress.ip_address("fd00:2::20"))
    assert (version, proto, sport, dport) == (6, 6, 1, 443)
    assert src == int(ipaddress.ip_address("fd00:1::10"))
    routed = bytes(IPv6(src="::1", dst="::2") / IPv6ExtHdrRouting() / IPv6ExtHdrHopByHop() / TCP(sport=5, dport=6))
    assert ip.flow_of(routed)[3:] == (6, 5, 6)


def test_flow_of_ipv6_fragments() -> None:
    first = bytes(IPv6() / IPv6ExtHdrFragment(offset=0, m=1) / TCP(sport=7, dport=8))
    later = bytes(IPv6() / IPv6ExtHdrFragment(offset=10, m=0, nh=6) / Raw(bytes(16)))
    assert ip.flow_of(first)[3:] == (6, 7, 8)
    assert ip.flow_of(later)[3:] == (6, ip.OPAQUE, ip.OPAQUE)


def test_ipv6_transport_split_positions() -> None:
    pkt = tcp6_ext()  # IPv6 / HBH / DestOpt / TCP: ESP goes after HBH, before DestOpt
    off, nh_field = ip.ipv6_transport_split(pkt)
    assert off == 48 and nh_field == 40 and pkt[nh_field] == ip.PROTO_DSTOPTS
    plain = bytes(IPv6() / UDP())
    assert ip.ipv6_transport_split(plain) == (40, 6)


def test_traffic_class_round_trip() -> None:
    v4 = bytearray(bytes(IP(tos=0x03) / UDP()))
    ip.set_traffic_class(v4, 0xB9)
    assert IP(bytes(v4)).tos == 0xB9
    assert IP(bytes(v4)).chksum == IP(bytes(IP(tos=0xB9) / UDP())).chksum
    v6 = bytearray(bytes(IPv6(tc=0x12, fl=0x54321) / UDP()))
    ip.set_traffic_class(v6, 0xFE)
    parsed = IPv6(bytes(v6))
    assert (parsed.tc, parsed.fl) == (0xFE, 0x54321)
    assert ip.traffic_class(bytes(v6)) == 0xFE


def test_esp_pad_and_header() -> None:
    assert esp.PAD[0] == b"" and esp.PAD[3] == b"\x01\x02\x03"
    for n in range(100):
        for block in (4, 16):
            assert (n + esp.pad_length(n, block) + 2) % block == 0
    assert esp.parse_header(b"\x00\x00\x10\x00\x00\x00\x00\x07") == (0x1000, 7)


def test_ah_lengths() -> None:
    # RFC 4302 §3.3.3.2.1: 32-bit alignment over IPv4, 64-bit over IPv6
    assert ah.icv_field_len(16, ipv6=False) == 16 and ah.icv_field_len(16, ipv6=True) == 20
    assert ah.icv_field_len(24, ipv6=True) == 28 and ah.icv_field_len(32, ipv6=True) == 36
    hdr = ah.build_header(6, 0x1234, 9, 20)
    assert len(hdr) == 32 and hdr[1] == 32 // 4 - 2 and ah.header_length(hdr[1]) == 32


def test_udp_encap_classify() -> None:
    assert udp_encap.classify(b"\xff") == udp_encap.KIND_KEEPALIVE
    assert udp_encap.classify(b"\x00\x00\x00\x00" + os.urandom(28)) == udp_encap.KIND_IKE
    assert udp_encap.classify(b"\x00\x00\x10\x00" + bytes(12)) == udp_encap.KIND_ESP
    assert udp_encap.classify(b"\x01\x02") == udp_encap.KIND_MALFORMED
    assert udp_encap.build_header(4500, 4500, 100) == b"\x11\x94\x11\x94\x00\x6c\x00\x00"
