"""The batch Datapath: two peers, SAD lookups, make-before-break, lifetimes, AH mutable fields."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import HBHOptUnknown, IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Raw

import ipsecstack
from ipsecstack import Action, Datapath, Lifetime, Policy, Reason, SecurityAssociation, Selector, Template
from ipsecstack.errors import ConfigError
from ipsecstack.sad import SAD
from tests.packets import icmp4, tcp4, udp6

GW_A, GW_B = "192.0.2.1", "192.0.2.2"


def _sa(spi: int, direction: str, *, src: str = GW_A, dst: str = GW_B, **kw: object) -> SecurityAssociation:
    args: dict[str, object] = {"key": bytes(range(20)), "tunnel_src": src, "tunnel_dst": dst, "direction": direction}
    args.update(kw)
    return SecurityAssociation(spi, **args)  # type: ignore[arg-type]


def _peers(reqid: int = 7) -> tuple[Datapath, Datapath]:
    a, b = Datapath(), Datapath()
    a.spd.add(Policy(Selector("10.1.0.0/16", "10.2.0.0/16"), Action.PROTECT, "out", Template(reqid=reqid)))
    b.spd.add(Policy(Selector("10.1.0.0/16", "10.2.0.0/16"), Action.PROTECT, "in", Template(reqid=reqid)))
    return a, b


def test_make_before_break_rekey_loses_nothing() -> None:
    a, b = _peers()
    old_out, old_in = _sa(0x100, "out", reqid=7), _sa(0x100, "in", reqid=7)
    a.install(old_out, 0.0)
    b.install(old_in, 0.0)
    in_flight = a.outbound([tcp4(size=i) for i in range(10)], 1.0).to_network
    # rekey: the responder installs the new inbound SA first, then the initiator switches outbound
    new_out, new_in = _sa(0x200, "out", reqid=7, key=bytes(20)), _sa(0x200, "in", reqid=7, key=bytes(20))
    b.install(new_in, 2.0)
    a.install(new_out, 2.0)
    after = a.outbound([tcp4(size=i) for i in range(10)], 3.0).to_network
    assert {p[20:24] for p in after} == {(0x200).to_bytes(4, "big")}
    got = b.inbound(in_flight + after, 4.0)
    assert len(got.to_inner) == 20 and not got.dropped
    a.remove(old_out)
    b.remove(old_in)
    assert b.inbound(in_flight[:1], 5.0).dropped[0][0] == Reason.UNKNOWN_SPI
    # removing the newest SA falls back to the previous one with the same reqid
    a.install(old_out, 6.0)
    a.install(new_out, 6.0)
    a.remove(new_out)
    assert a.outbound([tcp4()], 7.0).to_network[0][20:24] == (0x100).to_bytes(4, "big")


def test_acquire_then_install() -> None:
    a, _ = _peers()
    res = a.outbound([tcp4(), tcp4(), icmp4()], 0.0)
    assert len(res.acquires) == 1 and res.acquires[0].packet == tcp4()
    assert res.acquires[0].policy.template == Template(reqid=7)
    assert [r for r, _ in res.dropped] == [Reason.NO_SA] * 3
    a.install(_sa(0x300, "out", reqid=7), 1.0)
    assert len(a.outbound([tcp4()], 1.5).to_network) == 1
    a.remove(next(iter(a.sad)))
    assert len(a.outbound([tcp4()], 2.0).acquires) == 1  # installing cleared the pending acquire


def test_timer_fires_lifetimes_and_removes_dead_sas() -> None:
    a, _ = _peers()
    sa = _sa(0x400, "out", reqid=7, soft=Lifetime(seconds=10), hard=Lifetime(seconds=20))
    a.install(sa, 100.0)
    assert a.get_timer() == 110.0
    assert a.handle_timer(105.0) == []
    ev = a.handle_timer(110.0)
    assert [(e.kind, e.sa) for e in ev] == [("soft", sa)]
    assert a.get_timer() == 120.0
    ev = a.handle_timer(125.0)
    assert [(e.kind, e.trigger) for e in ev] == [("hard", "seconds")]
    assert sa not in a.sad and a.get_timer() is None
    assert a.outbound([tcp4()], 126.0).acquires


def test_soft_event_reported_in_batch_result() -> None:
    a, _ = _peers()
    a.install(_sa(0x500, "out", reqid=7, soft=Lifetime(packets=2)), 0.0)
    res = a.outbound([tcp4(), tcp4(), tcp4()], 0.0)
    assert [(e.kind, e.trigger) for e in res.events] == [("soft", "packets")]
    assert len(res.to_network) == 3


def test_an_outbound_sa_follows_its_peer(datapath_engine: str) -> None:
    """RFC 7296 §2.23: the peer's NAT mapping changed; the next packets go to the new address and port."""
    a, _ = _peers()
    out = _sa(0x800, "out", reqid=7, udp_encap=(4500, 4500))
    a.install(out, 0.0)
    assert out.native == (datapath_engine == "native")
    before = a.outbound([tcp4()], 1.0).to_network[0]
    assert before[16:20] == bytes([192, 0, 2, 2]) and before[22:24] == (4500).to_bytes(2, "big")
    a.move_peer(out, "198.51.100.9", 31337)
    after = a.outbound([tcp4()], 2.0).to_network[0]
    assert after[16:20] == bytes([198, 51, 100, 9]) and after[22:24] == (31337).to_bytes(2, "big")
    assert after[28:32] == (0x800).to_bytes(4, "big") and after[32:36] == (2).to_bytes(4, "big")  # no seq reused
    with pytest.raises(ConfigError, match="family"):
        a.move_peer(out, "2001:db8::9", None)


def test_counters_and_state_survive_a_remove_and_reinstall(datapath_engine: str) -> None:
    a, _ = _peers()
    out = _sa(0x900, "out", reqid=7)
    a.install(out, 0.0)
    a.outbound([tcp4(), tcp4()], 1.0)
    a.refresh()
    assert (out.seq, out.packets) == (2, 2)
    a.remove(out)
    assert not out.native and (out.seq, out.packets) == (2, 2)
    a.install(out, 2.0)
    wire = a.outbound([tcp4()], 3.0).to_network[0]
    assert wire[24:28] == (3).to_bytes(4, "big")  # the sequence space carries on
    a.refresh()
    assert (out.seq, out.packets) == (3, 3)


def test_sad_spi_collision_resolved_by_destination() -> None:
    sad = SAD()
    x = _sa(0x600, "in", dst="192.0.2.10")
    y = _sa(0x600, "in", dst="192.0.2.20", key=bytes(20))
    sad.add(x)
    sad.add(y)
    assert sad.lookup_inbound(0x600, 50, bytes([192, 0, 2, 10])) is x
    assert sad.lookup_inbound(0x600, 50, bytes([192, 0, 2, 20])) is y
    assert sad.lookup_inbound(0x600, 51, bytes([192, 0, 2, 20])) is None
    with pytest.raises(ConfigError, match="exists"):
        sad.add(_sa(0x600, "in", dst="192.0.2.10"))
    sad.remove(x)
    assert sad.lookup_inbound(0x600, 50, bytes([192, 0, 2, 99])) is y
    with pytest.raises(ConfigError, match="direction"):
        sad.add(_sa(0x700, None))  # type: ignore[arg-type]


def test_ipv6_and_ah_through_the_datapath() -> None:
    a, b = Datapath(), Datapath()
    tmpl = Template("ah", "tunnel", spi=0x800)
    a.spd.add(Policy(Selector("fd00:1::/64", "fd00:2::/64"), Action.PROTECT, "out", tmpl))
    b.spd.add(Policy(Selector("fd00:1::/64", "fd00:2::/64"), Action.PROTECT, "in", tmpl))
    kw = {"src": "2001:db8::1", "dst": "2001:db8::2", "protocol": "ah", "transform": "sha512", "key": bytes(64)}
    a.install(_sa(0x800, "out", **kw), 0.0)  # type: ignore[arg-type]
    b.install(_sa(0x800, "in", **kw), 0.0)  # type: ignore[arg-type]
    pkts = [udp6(payload=bytes([i]) * i) for i in range(1, 30)]
    wire = a.outbound(pkts, 0.0).to_network
    assert all(IPv6(w).nh == 51 for w in wire)
    assert b.inbound(wire, 0.0).to_inner == pkts


def test_ah_ignores_mutable_fields_and_covers_the_rest() -> None:
    tx = _sa(0x900, "out", protocol="ah", mode="transport", transform="sha256", key=bytes(32))
    rx = _sa(0x900, "in", protocol="ah", mode="transport", transform="sha256", key=bytes(32))
    inner = bytes(IP(src=GW_A, dst=GW_B, options=[IPOption_Router_Alert(), IPOption_RR(routers=["0.0.0.0"])])
                  / UDP() / Raw(b"x" * 10))  # fmt: skip
    wire = bytearray(ipsecstack.protect(tx, inner))
    wire[8] -= 3  # TTL decremented by routers
    wire[1] = 0xB8  # DSCP re-marked
    wire[27] = 10  # record-route option (mutable, RFC 4302 A.1) filled in on the way
    out = ipsecstack.unprotect(rx, bytes(wire))
    assert IP(out)[UDP].load == b"x" * 10
    wire = bytearray(ipsecstack.protect(tx, inner))
    wire[22] ^= 1  # router alert value is immutable
    with pytest.raises(ipsecstack.Dropped) as e:
        ipsecstack.unprotect(rx, bytes(wire))
    assert e.value.reason == Reason.BAD_ICV


def test_ah_ipv6_mutable_option_data() -> None:
    tx = _sa(0xA00, "out", protocol="ah", mode="transport", transform="sha256", key=bytes(32))
    rx = _sa(0xA00, "in", protocol="ah", mode="transport", transform="sha256", key=bytes(32))
    # option type 0x3e has the "may change en route" bit (0x20); 0x1e does not (RFC 8200 §4.2)
    hbh = IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0x3E, optdata=b"\x01\x02"),
                                      HBHOptUnknown(otype=0x1E, optdata=b"\x03\x04")])  # fmt: skip
    inner = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / hbh / UDP() / Raw(b"y" * 8))
    wire = bytearray(ipsecstack.protect(tx, inner))
    assert wire[40] == 51  # AH follows the hop-by-hop header
    wire[7] = 1  # hop limit
    wire[1] |= 0x0F  # flow label
    wire[44] ^= 0xFF  # mutable option data
    assert IPv6(ipsecstack.unprotect(rx, bytes(wire)))[UDP].load == b"y" * 8
    wire = bytearray(ipsecstack.protect(tx, inner))
    wire[48] ^= 0xFF  # immutable option data
    with pytest.raises(ipsecstack.Dropped) as e:
        ipsecstack.unprotect(rx, bytes(wire))
    assert e.value.reason == Reason.BAD_ICV


def test_readme_example_runs() -> None:
    """The manual-keying example in the package docstring (and README) works as written."""
    ip_packet = tcp4()
    key = bytes.fromhex("00112233445566778899aabbccddeeff01020304")
    out = ipsecstack.SecurityAssociation(0x1001, "esp", "tunnel", "aes128gcm16", key,
                                         tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")  # fmt: skip
    inb = ipsecstack.SecurityAssociation(0x1001, "esp", "tunnel", "aes128gcm16", key,
                                         tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")  # fmt: skip
    wire = ipsecstack.protect(out, ip_packet)
    assert ipsecstack.unprotect(inb, wire) == ip_packet


def test_decide_out_says_what_a_whole_flow_may_skip(datapath_engine: str) -> None:
    """The native forwarder's flow cache learns only decisions that hold for every packet of the flow."""
    from ipsecstack.datapath import DISCARD_FLOW

    a, _ = _peers()
    a.spd.add(Policy(Selector("10.1.0.0/16", "10.9.0.0/16"), Action.DISCARD, "out"), 0)
    a.spd.add(Policy(Selector("10.1.0.0/16", "10.8.0.0/16"), Action.BYPASS, "out"), 0)
    assert a.decide_out(tcp4()) is None  # PROTECT without an SA yet: acquire, ask again
    out = _sa(0xA00, "out", reqid=7)
    a.install(out, 0.0)
    assert a.decide_out(tcp4()) == (0xA00 if datapath_engine == "native" else None)
    assert a.decide_out(tcp4(dst="10.9.0.1")) == DISCARD_FLOW
    assert a.decide_out(tcp4(dst="10.8.0.1")) is None  # BYPASS goes through Python
    assert a.decide_out(b"\x45") is None  # unreadable selectors
    a.expire(out, hard=True)
    assert a.decide_out(tcp4()) is None


def test_inbound_decrypted_checks_the_policy_of_the_sa(datapath_engine: str) -> None:
    _, b = _peers()
    inb = _sa(0xB00, "in", reqid=7)
    b.install(inb, 0.0)
    other = _sa(0xB01, "in", reqid=8)  # an SA of another child: the policy names reqid 7
    b.install(other, 0.0)
    if datapath_engine != "native":
        res, ok = b.inbound_decrypted([(0xB00, tcp4())], 1.0)
        assert res.dropped[0][0] == Reason.UNKNOWN_SPI and ok == []  # only the native engine decrypts alone
        return
    good, bad = tcp4(), tcp4(dst="10.2.0.5")
    res, ok = b.inbound_decrypted([(0xB00, good), (0xB01, bad), (0xB02, good)], 1.0)
    assert res.to_inner == [good] and ok == [0]
    assert [r for r, _ in res.dropped] == [Reason.POLICY_MISMATCH, Reason.UNKNOWN_SPI]
    assert other.drops == {Reason.POLICY_MISMATCH: 1}
