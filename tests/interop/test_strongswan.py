"""The truth test: ipsecstack against strongSwan (charon + kernel-libipsec) in namespaces.

ipsecstack runs ``ipsecstack run`` in namespace A (TUN inner side, ESP in UDP on 4500 outer side,
IKE on 500/4500); strongSwan runs in namespace B with its userspace ESP. Site-to-site layout:
10.1.0.0/16 behind A, 10.2.0.0/16 behind B. Either side initiates; then ping and a TCP transfer
cross the tunnel, and both sides must agree on the SAs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop import strongswan as sw
from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _ping, _tcp_transfer

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

PSK = "interop-psk-0123456789abcdef"

CONFIG = """
[agent]
inner_backend = "tun"
outer_backend = "udp"
tun_name = "ips0"
tun_addrs = ["10.1.0.1/16"]
log_level = "info"

[connections.swan]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["{ike}"]
local = {{ auth = "psk", id = "{local}" }}
remote = {{ auth = "psk", id = "{remote}" }}

[connections.swan.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
esp_proposals = ["{esp}"]
start_action = "{start}"

[secrets.ike.swan]
secret = "{psk}"
"""

SUITES = [
    ("aes128gcm16-prfsha256-x25519", "aes128gcm16", "AES_GCM_16", "CURVE_25519"),
    ("chacha20poly1305-prfsha256-ecp256", "chacha20poly1305", "CHACHA20_POLY1305", "ECP_256"),
    ("aes128-sha256-modp2048", "aes128-sha256", "AES_CBC", "MODP_2048"),
]


def _require() -> None:
    nsutil.need_root()
    missing = sw.missing_requirements()
    if missing:
        pytest.skip("strongSwan interop needs: " + "; ".join(missing))


def _lan(ns: nsutil.Netns, addr: str) -> None:
    # charon installs routes only if it owns an address inside local_ts (no dummy module here: a veth pair)
    ns.run("ip", "link", "add", "inner0", "type", "veth", "peer", "name", "inner1")
    ns.run("ip", "addr", "add", addr, "dev", "inner0")
    ns.run("ip", "link", "set", "inner1", "up")
    ns.run("ip", "link", "set", "inner0", "up")


@pytest.mark.parametrize("initiator", ["ipsecstack", "strongswan"])
@pytest.mark.parametrize(("ike", "esp", "swan_encr", "swan_dh"), SUITES, ids=[s[0] for s in SUITES])
def test_interop(initiator: str, ike: str, esp: str, swan_encr: str, swan_dh: str, tmp_path: Path) -> None:
    _require()
    with nsutil.netns_pair("ix") as pair:
        _lan(pair.b, "10.2.0.1/16")
        cfg = CONFIG.format(local=pair.addr_a, remote=pair.addr_b, ike=ike, esp=esp, psk=PSK,
                            start="start" if initiator == "ipsecstack" else "none")  # fmt: skip
        (tmp_path / "a.toml").write_text(cfg)
        with sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, psk=PSK, local_ts="10.2.0.0/16",
                           remote_ts="10.1.0.0/16", ike_proposals=ike, esp_proposals=esp, conn="swan",
                           child="net") as swan:  # fmt: skip
            d = Daemon(pair.a, tmp_path / "a.toml")
            try:
                nsutil.wait_for(d.started, timeout=20, what="ipsecstack to start")
                if initiator == "strongswan":
                    swan.initiate("net")
                nsutil.wait_for(lambda: "child sa installed" in d.output(), timeout=30,
                                what=f"ipsecstack child SA:\n{d.output()}\n{swan.log_tail(40)}")  # fmt: skip
                ike_sa, child = swan.wait_established(timeout=15)
                assert ike_sa.info["encr-alg"] == swan_encr and ike_sa.info["dh-group"] == swan_dh, ike_sa.info
                assert child.info["encr-alg"] == swan_encr and child.info.get("encap") == "yes", child.info
                assert child.info["local-ts"] == ["10.2.0.0/16"] and child.info["remote-ts"] == ["10.1.0.0/16"]
                spi_in, spi_out = f"0x{child.spi_out:08x}", f"0x{child.spi_in:08x}"
                assert f"spi_in={spi_in}" in d.output() and f"spi_out={spi_out}" in d.output(), d.output()
                _ping(pair, "10.1.0.1", "10.2.0.1")
                nbytes, _ = _tcp_transfer(pair, "10.2.0.1")
                assert nbytes > 1 << 20
                found = swan.established()
                assert found is not None and found[1].packets_in > 100 and found[1].packets_out > 50, found
                assert PSK not in d.output()
            finally:
                rc = d.terminate()
            assert rc == 0, d.output()
            # ipsecstack deleted its IKE SA on shutdown: strongSwan's goes away too
            nsutil.wait_for(
                lambda: not swan.list_sas(), timeout=10, what=f"strongSwan to drop the SA\n{swan.log_tail()}"
            )
