"""Prometheus metrics read the live counters at scrape time (no per-packet cost)."""

from __future__ import annotations

from prometheus_client import generate_latest

from backends.memory import MemoryLink
from ipsecstack import Datapath, SecurityAssociation
from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import PeerConfig, identity
from ipsecstack.runtime.metrics import registry_for
from ipsecstack.runtime.node import Node
from tests.packets import tcp4


class _Ike:
    def __init__(self, manager: IkeManager) -> None:
        self.manager = manager


def test_metrics_reflect_state() -> None:
    dp = Datapath()
    sa = SecurityAssociation(0x1234, "esp", "tunnel", "aes128gcm16", bytes(20), direction="in", name="site/net",
                             tunnel_src="192.0.2.2", tunnel_dst="192.0.2.1")  # fmt: skip
    dp.install(sa, 0.0)
    link = MemoryLink()
    node = Node(dp, link.a, MemoryLink().a)
    peer = PeerConfig("site", "192.0.2.1", "192.0.2.2", [props.parse("aes128gcm16-prfsha256-x25519", Protocol.IKE)],
                      identity("192.0.2.1"), None, b"psk")  # fmt: skip
    mgr = IkeManager([peer], seeded_rng(1))
    mgr.stats["cookies_sent"] = 3
    tx = SecurityAssociation(0x1234, "esp", "tunnel", "aes128gcm16", bytes(20), tunnel_src="192.0.2.2",
                             tunnel_dst="192.0.2.1")  # fmt: skip
    from ipsecstack import protect

    good = protect(tx, tcp4())
    dp.inbound([good, good, b"\x45" + bytes(30)], 1.0)  # one delivered, one replay, one malformed
    text = generate_latest(registry_for(node, _Ike(mgr))).decode()
    assert 'ipsecstack_connection_up{connection="site"} 0.0' in text  # configured but down
    assert 'ipsecstack_sa_packets_total{connection="site/net",direction="in",spi="0x00001234"} 1.0' in text
    assert (
        'ipsecstack_sa_drops_total{connection="site/net",direction="in",reason="replay",spi="0x00001234"} 1.0' in text
    )
    assert 'ipsecstack_datapath_drops_total{reason="replay"} 1.0' in text
    assert 'ipsecstack_ike_events_total{kind="cookies_sent"} 3.0' in text
    assert 'ipsecstack_ike_sas{state="init_done"} 0.0' in text
    mgr.initiate("site", 2.0)
    text = generate_latest(registry_for(node, _Ike(mgr))).decode()
    assert 'ipsecstack_ike_sas{state="init_sent"} 1.0' in text


def test_wireshark_lines_use_wiresharks_labels() -> None:
    from ipsecstack.keyexport import esp_lines, ike_lines

    esp = [
        {"spi": 0x1001, "protocol": "esp", "transform": "aes128-sha256", "direction": "out", "src": "192.0.2.1",
         "dst": "192.0.2.2", "key": ("11" * 16) + ("22" * 32), "encap": None},
        {"spi": 0x1002, "protocol": "esp", "transform": "chacha20poly1305", "direction": "in", "src": "192.0.2.2",
         "dst": "192.0.2.1", "key": "33" * 36, "encap": None},
    ]  # fmt: skip
    (line,) = esp_lines(esp)  # ChaCha20 is skipped: Wireshark 4.0 cannot decrypt it
    assert line == ('"IPv4","192.0.2.1","192.0.2.2","0x00001001","AES-CBC [RFC3602]","0x' + "11" * 16
                    + '","HMAC-SHA-256-128 [RFC4868]","0x' + "22" * 32 + '"')  # fmt: skip
    ike = [{"spi_i": "aa" * 8, "spi_r": "bb" * 8, "encr": "aes128gcm16", "integ": None, "sk_ei": "01" * 20,
            "sk_er": "02" * 20, "sk_ai": "", "sk_ar": ""}]  # fmt: skip
    want = f'{"aa" * 8},{"bb" * 8},{"01" * 20},{"02" * 20},"AES-GCM-128 with 16 octet ICV [RFC5282]",,,"NONE [RFC4306]"'
    assert ike_lines(ike) == [want]
