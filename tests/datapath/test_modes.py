"""Tunnel and transport mode header rules (RFC 4301 §5.1.2, §8.1; RFC 6040; RFC 4303 §2.4; RFC 3948)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from ipsecstack import Dropped, Reason, SecurityAssociation, protect, seeded_rng, unprotect
from tests.packets import tcp4, udp4, udp6

V4 = {"tunnel_src": "192.0.2.1", "tunnel_dst": "192.0.2.2"}
V6 = {"tunnel_src": "2001:db8::1", "tunnel_dst": "2001:db8::2"}


def _pair(**kw: object) -> tuple[SecurityAssociation, SecurityAssociation]:
    args: dict[str, object] = {"spi": 0x200, "key": bytes(range(20)), **V4}
    args.update(kw)
    return SecurityAssociation(**args), SecurityAssociation(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("outer", "inner"), [(V4, tcp4()), (V4, udp6()), (V6, tcp4()), (V6, udp6())],
                         ids=["4in4", "6in4", "4in6", "6in6"])  # fmt: skip
def test_tunnel_families(outer: dict[str, str], inner: bytes) -> None:
    tx, rx = _pair(**outer)
    wire = protect(tx, inner)
    parsed = (IPv6 if "::" in outer["tunnel_src"] else IP)(wire)
    if "::" in outer["tunnel_src"]:
        assert (parsed.nh, parsed.hlim, parsed.src, parsed.plen) == (50, 64, "2001:db8::1", len(wire) - 40)
    else:
        assert (parsed.proto, parsed.ttl, parsed.src, parsed.len) == (50, 64, "192.0.2.1", len(wire))
    assert unprotect(rx, wire) == inner


def test_outer_header_dscp_ttl_df() -> None:
    inner = tcp4(tos=0xB8 | 0x02)  # EF + ECT(0), DF set by the builder
    tx, _ = _pair(ttl=17)
    outer = IP(protect(tx, inner))
    assert outer.tos == 0xBA and outer.ttl == 17 and outer.flags == "DF"
    tx, _ = _pair(copy_dscp=False, df="clear")
    outer = IP(protect(tx, inner))
    assert outer.tos == 0x02 and outer.flags == 0
    tx, _ = _pair(ecn="compat")
    assert IP(protect(tx, inner)).tos == 0xB8  # RFC 6040 compatibility mode: outer Not-ECT
    no_df = bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags=0) / UDP())
    tx, _ = _pair()
    assert IP(protect(tx, no_df)).flags == 0  # DF copied
    tx, _ = _pair(df="set")
    assert IP(protect(tx, no_df)).flags == "DF"
    tx, _ = _pair()
    assert IP(protect(tx, udp6())).flags == "DF"  # IPv6 inner is never fragmented on the way
    tx, _ = _pair(**V6)
    assert IPv6(protect(tx, tcp4(tos=0xB8 | 0x01))).tc == 0xB9


# RFC 6040 §4.2, the decapsulation table: rows inner ECN, columns outer ECN (Not-ECT, ECT(1), ECT(0), CE)
# codepoints: Not-ECT=0, ECT(1)=1, ECT(0)=2, CE=3; None = drop
ECN_TABLE = {
    0: {0: 0, 1: 0, 2: 0, 3: None},
    2: {0: 2, 1: 1, 2: 2, 3: 3},
    1: {0: 1, 1: 1, 2: 1, 3: 3},
    3: {0: 3, 1: 3, 2: 3, 3: 3},
}


@pytest.mark.parametrize("inner_ecn", [0, 1, 2, 3])
@pytest.mark.parametrize("outer_ecn", [0, 1, 2, 3])
def test_rfc6040_decapsulation(inner_ecn: int, outer_ecn: int) -> None:
    inner = tcp4(tos=0x20 | inner_ecn)
    tx, rx = _pair()
    wire = bytearray(protect(tx, inner))
    wire[1] = (wire[1] & 0xFC) | outer_ecn  # a router on the way re-marks the outer header
    expected = ECN_TABLE[inner_ecn][outer_ecn]
    if expected is None:
        with pytest.raises(Dropped) as e:
            unprotect(rx, bytes(wire))
        assert e.value.reason == Reason.ECN_DROP
        return
    out = IP(unprotect(rx, bytes(wire)))
    assert out.tos == 0x20 | expected
    fresh = out.copy()
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == out.chksum  # the rewritten inner header's checksum is valid


def test_transport_mode_rewrites_protocol_length_checksum() -> None:
    inner = udp4("192.0.2.1", "192.0.2.2")
    tx, rx = _pair(mode="transport")
    wire = protect(tx, inner)
    outer = IP(wire)
    assert outer.proto == 50 and outer.len == len(wire) and outer.src == "192.0.2.1"
    fresh = IP(src=outer.src, dst=outer.dst, id=outer.id, flags=outer.flags, ttl=outer.ttl, proto=50) / outer.payload
    assert outer.chksum == IP(bytes(fresh)).chksum
    assert unprotect(rx, wire) == inner
    v6 = udp6("2001:db8::1", "2001:db8::2")
    tx, rx = _pair(mode="transport")
    w6 = IPv6(protect(tx, v6))
    assert w6.nh == 50 and w6.plen == len(bytes(w6)) - 40
    assert unprotect(rx, bytes(w6)) == v6


def test_transport_mode_link_padding_is_ignored() -> None:
    inner = udp4("192.0.2.1", "192.0.2.2")
    tx, rx = _pair(mode="transport")
    assert unprotect(rx, protect(tx, inner + b"\x00" * 6)) == inner


def test_tfc_padding_is_random_and_trimmed() -> None:
    tx, rx = _pair(tfc_padding=200, rng=seeded_rng(3))
    inner = tcp4(size=10)
    lengths = set()
    for _ in range(20):
        wire = protect(tx, inner)
        lengths.add(len(wire))
        assert unprotect(rx, wire) == inner
    assert len(lengths) > 5


def test_udp_encapsulation_headers() -> None:
    tx, rx = _pair(udp_encap=(4500, 4500))
    raw = protect(tx, tcp4())
    assert unprotect(rx, raw) == tcp4()
    wire = IP(raw)
    assert wire.proto == 17 and wire[UDP].sport == 4500 and wire[UDP].dport == 4500
    assert wire[UDP].chksum == 0  # RFC 3948 §2.1: SHOULD be zero over IPv4
    assert wire[UDP].len == len(bytes(wire)) - 20
    tx6, _ = _pair(udp_encap=(4501, 4500), **V6)
    w6 = IPv6(protect(tx6, tcp4()))
    got = w6[UDP].chksum
    del w6[UDP].chksum
    assert got != 0 and got == IPv6(bytes(w6))[UDP].chksum  # a real checksum over IPv6


def test_transport_nat_t_recomputes_l4_checksum() -> None:
    """RFC 3948 §3.1.2: after a NAT rewrote the outer addresses, the TCP checksum must be recomputed."""
    inner = bytes(IP(src="10.0.0.5", dst="192.0.2.2") / TCP(sport=1000, dport=22) / b"data")
    tx, rx = _pair(mode="transport", udp_encap=(4500, 4500))
    wire = IP(protect(tx, inner))
    wire.src = "198.51.100.7"  # the NAT's public address
    del wire.chksum
    out = IP(unprotect(rx, bytes(wire)))
    assert out.src == "198.51.100.7"
    got = out[TCP].chksum
    del out[TCP].chksum
    assert got == IP(bytes(out))[TCP].chksum
