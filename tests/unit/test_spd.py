"""SPD: the seed lecture's example, first-match semantics against a naive model, and selectors."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template
from ipsecstack.errors import ConfigError, Reason
from ipsecstack.spd import SPD
from ipsecstack.wire import ip
from tests.packets import icmp4, tcp4, udp4

# The lecture's sender SPD, as written:
#   src 192.168.0.0/16, dest 10.0.1.3  port 443, pass           # SSL/TLS traffic
#   src 192.168.0.0/16, dest 10.0.0.0/8 port 139, discard       # Windows file sharing
#   src 192.168.0.0/16, dest 10.0.0.0/8 port 80,  IPsec: SPI=4  # http
#   src 192.168.0.0/16, dest 10.0.0.0/8,          IPsec: SPI=5  # all other traffic to "the 10 network"
SEED = [
    Policy(Selector("192.168.0.0/16", "10.0.1.3", dport=443), Action.BYPASS, name="tls"),
    Policy(Selector("192.168.0.0/16", "10.0.0.0/8", dport=139), Action.DISCARD, name="smb"),
    Policy(Selector("192.168.0.0/16", "10.0.0.0/8", dport=80), Action.PROTECT, template=Template(spi=4), name="http"),
    Policy(Selector("192.168.0.0/16", "10.0.0.0/8"), Action.PROTECT, template=Template(spi=5), name="rest"),
]


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (tcp4("192.168.1.1", "10.0.1.3", dport=443), "tls"),
        (tcp4("192.168.1.1", "10.0.1.4", dport=443), "rest"),
        (tcp4("192.168.1.1", "10.9.9.9", dport=139), "smb"),
        (tcp4("192.168.1.1", "10.0.1.3", dport=139), "smb"),
        (tcp4("192.168.1.1", "10.0.1.3", dport=80), "http"),
        (udp4("192.168.200.7", "10.250.0.1", dport=80), "http"),
        (icmp4("192.168.1.1", "10.0.0.1"), "rest"),
        (tcp4("172.16.0.1", "10.0.1.3", dport=443), None),
        (tcp4("192.168.1.1", "11.0.0.1", dport=80), None),
    ],
)
def test_seed_example_lookup(packet: bytes, expected: str | None) -> None:
    spd = SPD(SEED)
    pol = spd.lookup("out", ip.flow_of(packet))
    assert (pol.name if pol else None) == expected


def test_seed_example_through_the_datapath() -> None:
    """The four lines behave as written: pass, discard, ESP with SPI 4, ESP with SPI 5."""
    dp = Datapath(SPD(SEED))
    for spi in (4, 5):
        dp.install(
            SecurityAssociation(spi, "esp", "tunnel", "aes128gcm16", bytes(20), direction="out",
                                tunnel_src="198.51.100.1", tunnel_dst="203.0.113.1"),
            now=0.0,
        )  # fmt: skip
    tls = tcp4("192.168.1.1", "10.0.1.3", dport=443)
    smb = tcp4("192.168.1.1", "10.1.1.1", dport=139)
    http = tcp4("192.168.1.1", "10.1.1.1", dport=80)
    res = dp.outbound([tls, smb, http, udp4("192.168.1.1", "10.1.1.1")], now=1.0)
    assert res.to_network[0] == tls  # pass: unchanged
    assert [r for r, _ in res.dropped] == [Reason.POLICY_DISCARD]
    spis = [int.from_bytes(p[20:24], "big") for p in res.to_network[1:]]
    assert [p[9] for p in res.to_network[1:]] == [50, 50]
    assert spis == [4, 5]


def test_insert_changes_priority_and_invalidates_cache() -> None:
    spd = SPD(SEED)
    flow = ip.flow_of(tcp4("192.168.1.1", "10.0.1.3", dport=443))
    assert spd.lookup("out", flow) is SEED[0]
    block = Policy(Selector("192.168.0.0/16", "10.0.0.0/8"), Action.DISCARD, name="block")
    spd.add(block, index=0)
    assert spd.lookup("out", flow) is block
    spd.remove(block)
    assert spd.lookup("out", flow) is SEED[0]
    assert spd.lookup("in", flow) is None


def test_icmp_type_and_code_act_as_ports() -> None:
    echo = ip.flow_of(icmp4())
    assert echo[4:] == (8, 0)
    assert Selector(proto="icmp", sport=8).matches(echo)
    assert not Selector(proto="icmp", sport=0).matches(echo)


def test_non_initial_fragment_matches_only_portless_selectors() -> None:
    frag = bytearray(tcp4())
    frag[6:8] = (100).to_bytes(2, "big")  # fragment offset 100*8
    flow = ip.flow_of(bytes(frag))
    assert flow[4] == ip.OPAQUE
    assert Selector("10.0.0.0/8", "10.0.0.0/8").matches(flow)
    assert not Selector("10.0.0.0/8", "10.0.0.0/8", dport=80).matches(flow)
    assert Selector("10.0.0.0/8", "10.0.0.0/8", dport=(0, 65535)).matches(flow)


def test_family_is_respected() -> None:
    assert not Selector("::/0").matches((4, 0, 0, 6, 1, 2))
    assert Selector().matches((6, 1, 2, 6, 1, 2))
    assert Selector("0.0.0.0/0").matches((4, 1, 2, 6, 1, 2))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"src": "10.0.0.300/8"}, "src"),
        ({"src": "10.0.0.0/8", "dst": "2001:db8::/32"}, "dst"),
        ({"dport": 70000}, "dport"),
        ({"sport": (90, 80)}, "sport"),
        ({"proto": "bogus"}, "proto"),
    ],
)
def test_selector_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        Selector(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field
    assert e.value.fix


def test_policy_errors() -> None:
    with pytest.raises(ConfigError, match="template"):
        Policy(Selector(), Action.PROTECT)
    with pytest.raises(ConfigError, match="template"):
        Policy(Selector(), Action.BYPASS, template=Template(spi=1))
    with pytest.raises(ConfigError, match="spi"):
        Template()


# --- property test against a naive matcher ------------------------------------------------------

NETS = ["10.0.0.0/8", "10.0.1.0/24", "10.0.1.3/32", "192.168.0.0/16", "0.0.0.0/0", None]
PORTS = [None, 80, 443, (1000, 2000), (0, 1023)]
PROTOS = [None, "tcp", "udp", 1]


def _naive_match(
    sel: tuple[str | None, str | None, object, object, object], pkt: tuple[str, str, int, int, int]
) -> bool:
    src, dst, proto, sport, dport = sel
    psrc, pdst, pproto, psport, pdport = pkt
    names = {"tcp": 6, "udp": 17}
    if src and ipaddress.ip_address(psrc) not in ipaddress.ip_network(src):
        return False
    if dst and ipaddress.ip_address(pdst) not in ipaddress.ip_network(dst):
        return False
    if proto is not None and names.get(proto, proto) != pproto:  # type: ignore[call-overload]
        return False
    for want, got in ((sport, psport), (dport, pdport)):
        if want is None:
            continue
        lo, hi = (want, want) if isinstance(want, int) else want
        if not lo <= got <= hi:
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(
    sels=st.lists(
        st.tuples(st.sampled_from(NETS), st.sampled_from(NETS), st.sampled_from(PROTOS), st.sampled_from(PORTS),
                  st.sampled_from(PORTS)),
        min_size=1, max_size=12,
    ),
    pkts=st.lists(
        st.tuples(st.sampled_from(["10.0.1.3", "10.0.2.1", "192.168.5.5", "8.8.8.8"]),
                  st.sampled_from(["10.0.1.3", "10.7.7.7", "192.168.0.1", "1.1.1.1"]),
                  st.sampled_from([6, 17]), st.sampled_from([80, 443, 1500, 5000]),
                  st.sampled_from([80, 443, 1500, 22])),
        min_size=1, max_size=20,
    ),
)  # fmt: skip
def test_first_match_equals_naive_model(sels: list, pkts: list) -> None:  # type: ignore[type-arg]
    policies = [Policy(Selector(*s), Action.BYPASS, name=str(i)) for i, s in enumerate(sels)]
    spd = SPD(policies)
    for p in pkts * 2:  # twice: the second pass is answered by the flow cache
        src, dst, proto, sport, dport = p
        flow = (4, int(ipaddress.ip_address(src)), int(ipaddress.ip_address(dst)), proto, sport, dport)
        want = next((pol for s, pol in zip(sels, policies, strict=True) if _naive_match(s, p)), None)
        assert spd.lookup("out", flow) is want
