"""The outer plane speaks datagrams (issue #10): ESP in UDP to and from a UDP socket without IP headers.

``outbound(datagrams=True)`` must put on the wire exactly the ESP bytes the whole-packet path puts after
its UDP header, to the same place with the same TOS; ``inbound(datagrams=...)`` must give the same
inner packets, drops and IKE messages as the whole packets the datagrams were. Both engines run these
(conftest): SAs on the native engine keep answering with whole packets.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from ipsecstack import Action, Datapath, Policy, Reason, SecurityAssociation, Selector, Template
from ipsecstack.wire.udp_encap import Datagram, OutDatagram, to_ip_packet
from tests.packets import tcp4, udp6

KEY = bytes(range(20))

# (name, mode, outer a, outer b, inner packet, selector a->b)
CASES = [
    ("tunnel-v4", "tunnel", "192.0.2.1", "192.0.2.2", tcp4(size=300, tos=0x28 | 2), ("10.1.0.0/16", "10.2.0.0/16")),
    ("tunnel-v6-outer", "tunnel", "2001:db8::1", "2001:db8::2", tcp4(size=64), ("10.1.0.0/16", "10.2.0.0/16")),
    ("tunnel-v6", "tunnel", "2001:db8::1", "2001:db8::2", udp6(tc=0x10), ("fd00:1::/64", "fd00:2::/64")),
    ("transport-v4", "transport", "10.1.0.10", "10.2.0.20", tcp4(size=200, tos=0x10), ("10.1.0.10", "10.2.0.20")),
    ("transport-v6", "transport", "fd00:1::10", "fd00:2::20", udp6(), ("fd00:1::10", "fd00:2::20")),
]


def _sa(mode: str, direction: str, a: str, b: str, dport: int = 4500) -> SecurityAssociation:
    return SecurityAssociation(0x4242, "esp", mode, "aes128gcm16", KEY, direction=direction,
                               tunnel_src=a, tunnel_dst=b, udp_encap=(4500, dport), reqid=1)  # fmt: skip


def _pair(mode: str, a: str, b: str, sel: tuple[str, str], **kw: object) -> tuple[Datapath, Datapath]:
    out, inn = Datapath(**kw), Datapath()  # type: ignore[arg-type]
    out.spd.add(Policy(Selector(*sel), Action.PROTECT, "out", Template(reqid=1)))
    inn.spd.add(Policy(Selector(*sel), Action.PROTECT, "in", Template(reqid=1)))
    out.install(_sa(mode, "out", a, b), 0.0)
    inn.install(_sa(mode, "in", a, b), 0.0)
    return out, inn


def _as_datagram(pkt: bytes) -> Datagram:
    """What a UDP socket reports of a whole ESP-in-UDP packet."""
    if pkt[0] >> 4 == 4:
        ip4 = IP(pkt)
        src, dst, tos, ttl, udp = ip4.src, ip4.dst, ip4.tos, ip4.ttl, ip4[UDP]
        packed = bytes(ip4)[12:16], bytes(ip4)[16:20]
    else:
        ip6 = IPv6(pkt)
        src, dst, tos, ttl, udp = ip6.src, ip6.dst, ip6.tc, ip6.hlim, ip6[UDP]
        packed = bytes(ip6)[8:24], bytes(ip6)[24:40]
    assert src and dst
    return Datagram(packed[0], packed[1], udp.sport, udp.dport, tos, ttl, bytes(udp.payload))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_datagram_is_the_whole_packet_less_its_headers(case: tuple[str, str, str, str, bytes, tuple[str, str]],
                                                          datapath_engine: str) -> None:  # fmt: skip
    _name, mode, a, b, inner, sel = case
    whole_out, whole_in = _pair(mode, a, b, sel)
    dgram_out, dgram_in = _pair(mode, a, b, sel)
    whole = whole_out.outbound([inner], 1.0)
    res = dgram_out.outbound([inner], 1.0, datagrams=True)
    assert not whole.dropped and not res.dropped
    (pkt,) = whole.to_network
    expect = _as_datagram(pkt)
    if datapath_engine == "native":  # the engine seals whole packets: they go out as before
        assert res.to_network == [pkt] and not res.to_peer
    else:
        assert not res.to_network
        assert res.to_peer == [OutDatagram(expect.payload, expect.dst, 4500, expect.tos)]
    # received: the datagram opens to the same inner packet as the packet the socket saw (transport mode
    # keeps the outer header, of which a UDP socket reports addresses, TOS and TTL: ID and DF are gone)
    got = dgram_in.inbound([], 2.0, [expect])
    assert got.to_inner == whole_in.inbound([to_ip_packet(expect)], 2.0).to_inner
    assert not got.dropped and len(got.to_inner) == 1
    if mode == "tunnel":
        assert got.to_inner == [inner]
    else:
        assert bytes(got.to_inner[0])[-40:] == inner[-40:]
    assert dgram_in.in_packets == 1


def test_a_gro_buffer_opens_as_views_and_outer_ecn_reaches_the_inner_packet(datapath_engine: str) -> None:
    out, inn = _pair("tunnel", "192.0.2.1", "192.0.2.2", ("10.1.0.0/16", "10.2.0.0/16"))
    inner = [tcp4(size=400, tos=0x02) for _ in range(5)]  # ECT(0)
    sealed = out.outbound(inner, 1.0, datagrams=True)
    payloads = [d.payload for d in sealed.to_peer] or [_as_datagram(p).payload for p in sealed.to_network]
    assert len({len(p) for p in payloads}) == 1
    buf = memoryview(b"".join(payloads))
    size = len(payloads[0])
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    views = [Datagram(src, dst, 4500, 4500, 0x03, 64, buf[o : o + size]) for o in range(0, len(buf), size)]
    got = inn.inbound([], 2.0, views)
    assert not got.dropped and len(got.to_inner) == 5
    assert all(IP(p).tos == 0x03 for p in got.to_inner)  # RFC 6040 §4.2: CE on ECT(0) marks the inner CE
    assert [bytes(IP(p).payload) for p in got.to_inner] == [bytes(IP(p).payload) for p in inner]


def test_ike_keepalives_and_garbage_on_the_socket_are_sorted_not_raised(datapath_engine: str) -> None:
    _o, inn = _pair("tunnel", "192.0.2.1", "192.0.2.2", ("10.1.0.0/16", "10.2.0.0/16"))
    peer, me = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])

    def d(payload: bytes) -> Datagram:
        return Datagram(peer, me, 31337, 4500, 0, 64, payload)

    ike = b"\x00\x00\x00\x00" + b"I" * 40
    forged = (0x4242).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes(56)  # the SPI, seq 1, no valid ICV
    unknown = b"\x00\x00\x99\x99" + bytes(40)
    res = inn.inbound([], 1.0, [d(ike), d(b"\xff"), d(unknown), d(b"\x01\x02"), d(forged), d(b"")])
    assert [(i.src, i.dst, i.sport, i.dport, i.message) for i in res.to_ike] == [(peer, me, 31337, 4500, b"I" * 40)]
    reasons = [r for r, _ in res.dropped]
    assert reasons == [Reason.NAT_KEEPALIVE, Reason.UNKNOWN_SPI, Reason.TRUNCATED, Reason.BAD_ICV, Reason.TRUNCATED]
    assert not res.to_inner and inn.in_packets == 6


def test_a_datagram_for_an_sa_without_encapsulation_is_refused(datapath_engine: str) -> None:
    dp = Datapath()
    sa = SecurityAssociation(0x77, "esp", "tunnel", "aes128gcm16", KEY, direction="in",
                             tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")  # fmt: skip
    dp.install(sa, 0.0)
    peer, me = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    res = dp.inbound([], 1.0, [Datagram(peer, me, 4500, 4500, 0, 64, (0x77).to_bytes(4, "big") + bytes(60))])
    assert [r for r, _ in res.dropped] == [Reason.ENCAP_MISMATCH]


def test_path_mtu_counts_the_headers_the_socket_adds(datapath_engine: str) -> None:
    """RFC 4301 §8: the outer packet is the datagram plus the IP and UDP headers the kernel writes."""
    asked: list[str] = []

    def link_mtu(addr: str) -> int:
        asked.append(addr)
        return 1400

    out, _i = _pair("tunnel", "192.0.2.1", "192.0.2.2", ("10.1.0.0/16", "10.2.0.0/16"), link_mtu=link_mtu)
    fits = bytes(IP(src="10.1.0.10", dst="10.2.0.20", flags="DF") / UDP(sport=1, dport=2) / Raw(bytes(1300)))
    big = bytes(IP(src="10.1.0.10", dst="10.2.0.20", flags="DF") / UDP(sport=1, dport=2) / Raw(bytes(1340)))
    res = out.outbound([fits, big], 1.0, datagrams=True)
    assert len(res.to_peer) + len(res.to_network) == 1 and asked == ["192.0.2.2"]
    assert res.dropped == [(Reason.PMTU_EXCEEDED, big)]
    (err,) = res.to_local
    icmp = IP(err)
    assert icmp.src == "192.0.2.1" and icmp.dst == "10.1.0.10" and icmp.type == 3 and icmp.code == 4
    assert icmp.nexthopmtu == 1400 - out.sad.lookup_outbound(Template(reqid=1)).overhead  # type: ignore[union-attr]
