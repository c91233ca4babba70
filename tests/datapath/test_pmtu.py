"""Path MTU (RFC 4301 §8): oversized protected packets are fragmented when they may be, else refused with ICMP."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw

from ipsecstack import Action, Datapath, Policy, Reason, SecurityAssociation, Selector, Template

A, B = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def _dp(src: str, dst: str, mtu: int = 1500) -> tuple[Datapath, SecurityAssociation, list[str]]:
    asked: list[str] = []

    def link_mtu(addr: str) -> int:
        asked.append(addr)
        return mtu

    dp = Datapath(link_mtu=link_mtu)
    dp.spd.add(Policy(Selector(src, dst), Action.PROTECT, "out", Template(spi=0x1001)))
    sa = SecurityAssociation(0x1001, "esp", "transport", "aes128gcm16", bytes(20), direction="out",
                             tunnel_src=src, tunnel_dst=dst)  # fmt: skip
    dp.install(sa, 0.0)
    return dp, sa, asked


def _udp4(size: int, df: bool) -> bytes:
    return bytes(IP(src=A, dst=B, flags="DF" if df else 0) / UDP(sport=4000, dport=9000) / Raw(b"u" * (size - 28)))


def test_df_set_too_big_is_refused_with_frag_needed_and_the_room_left() -> None:
    dp, sa, asked = _dp(A, B)
    pkt = _udp4(1500, df=True)
    res = dp.outbound([pkt], 1.0)
    assert not res.to_network and res.dropped == [(Reason.PMTU_EXCEEDED, pkt)] and dp.drops == {"pmtu_exceeded": 1}
    (err,) = res.to_local
    icmp = IP(err)
    assert icmp.src == A and icmp.dst == A and icmp[ICMP].type == 3 and icmp[ICMP].code == 4
    assert icmp[ICMP].nexthopmtu == 1500 - sa.overhead
    rebuilt = ICMP(bytes(icmp[ICMP]))  # a parsed packet keeps its checksum; a rebuilt one gets scapy's
    rebuilt.chksum = None
    assert ICMP(bytes(rebuilt)).chksum == icmp[ICMP].chksum
    assert icmp[IPerror].dst == B and icmp[UDPerror].sport == 4000 and icmp[UDPerror].dport == 9000
    assert len(err) <= 576 and asked == [B]
    # what fits the reported MTU fits the link once protected
    fits = _udp4(1500 - sa.overhead, df=True)
    (out,) = dp.outbound([fits], 2.0).to_network
    assert len(out) <= 1500 and asked == [B]  # the link MTU is asked once per destination


def test_df_clear_too_big_goes_on_for_the_kernel_to_fragment() -> None:
    dp, _sa, _ = _dp(A, B)
    res = dp.outbound([_udp4(1500, df=False)], 1.0)
    assert len(res.to_network) == 1 and len(res.to_network[0]) > 1500 and not res.to_local and not res.dropped


def test_small_packets_never_ask_for_the_mtu() -> None:
    dp, _sa, asked = _dp(A, B)
    assert len(dp.outbound([_udp4(1200, df=True)], 1.0).to_network) == 1 and asked == []


def test_ipv6_too_big_gets_packet_too_big() -> None:
    dp, sa, _ = _dp(A6, B6)
    pkt = bytes(IPv6(src=A6, dst=B6) / UDP(sport=4000, dport=9000) / Raw(b"u" * 1452))
    res = dp.outbound([pkt], 1.0)
    assert not res.to_network and res.dropped[0][0] == Reason.PMTU_EXCEEDED
    ptb = IPv6(res.to_local[0])
    assert ptb.src == A6 and ptb.dst == A6 and ptb[ICMPv6PacketTooBig].mtu == 1500 - sa.overhead
    check = ICMPv6PacketTooBig(bytes(ptb[ICMPv6PacketTooBig]))
    rebuilt = IPv6(src=A6, dst=A6) / check
    rebuilt[ICMPv6PacketTooBig].cksum = None
    assert IPv6(bytes(rebuilt))[ICMPv6PacketTooBig].cksum == ptb[ICMPv6PacketTooBig].cksum
    assert len(res.to_local[0]) <= 1280 and IPv6ExtHdrFragment not in ptb


def test_without_link_mtu_nothing_changes() -> None:
    dp = Datapath()
    dp.spd.add(Policy(Selector(A, B), Action.PROTECT, "out", Template(spi=0x1001)))
    dp.install(SecurityAssociation(0x1001, "esp", "transport", "aes128gcm16", bytes(20), direction="out",
                                   tunnel_src=A, tunnel_dst=B), 0.0)  # fmt: skip
    res = dp.outbound([_udp4(1500, df=True)], 1.0)
    assert len(res.to_network) == 1 and not res.to_local
