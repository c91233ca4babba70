"""Remote-access profiles against strongSwan: ipsecstack as a concentrator with three ``%any`` connections
(two PSK groups by identity, one for certificates), three charon clients at once, each in its own namespace
on one bridged LAN. Each must land in its own connection: the virtual IP from that connection's pool, the
traffic selectors of its child, and a ping through its tunnel."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from tests.interop import strongswan as sw
from tests.interop.test_strongswan import _require
from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon
from tests.pkiutil import Issued, issue

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
PLUGINS = (*sw.PLUGINS, "pkcs8", "constraints")

CONFIG = """
[agent]
tun_addrs = ["10.1.0.1/16"]
log_level = "info"

[pools.a]
addrs = "10.9.1.0/24"

[pools.b]
addrs = "10.9.2.0/24"

[pools.c]
addrs = "10.9.3.0/24"

[connections.psk-a]
local_addrs = ["{gw}"]
remote_addrs = ["%any"]
pools = ["a"]
local = {{ auth = "psk", id = "gw.example" }}
remote = {{ auth = "psk", id = "client-a@example" }}
children.net.local_ts = ["10.1.0.0/16"]

[connections.psk-b]
local_addrs = ["{gw}"]
remote_addrs = ["%any"]
pools = ["b"]
local = {{ auth = "psk", id = "gw.example" }}
remote = {{ auth = "psk", id = "client-b@example" }}
children.net.local_ts = ["10.1.0.0/24"]

[connections.certs]
local_addrs = ["{gw}"]
remote_addrs = ["%any"]
pools = ["c"]
local = {{ auth = "pubkey", certs = ["pki/gw.pem"] }}
remote = {{ auth = "pubkey", cacerts = ["pki/root.pem"] }}
children.net.local_ts = ["10.1.0.1/32"]

[secrets.ike.psk-a]
secret = "{psk_a}"

[secrets.ike.psk-b]
secret = "{psk_b}"

[secrets.private.gw]
file = "pki/gw.key"
"""
PSK_A, PSK_B = "group-a-psk-0123456789", "group-b-psk-9876543210"
# (client, its connection on the gateway, the virtual IP: the first of that connection's pool, its child's TS)
CLIENTS = [
    ("client-a@example", "psk-a", "10.9.1.1", "10.1.0.0/16"),
    ("client-b@example", "psk-b", "10.9.2.1", "10.1.0.0/24"),
    ("carl", "certs", "10.9.3.1", "10.1.0.1/32"),
]


def _pki(tmp_path: Path) -> tuple[Issued, Issued, Issued]:
    root = issue("Profiles Root CA", ca=True)
    gw, carl = issue("gw", root, san=("gw.example",)), issue("carl", root, san=("carl@example",))
    d = tmp_path / "pki"
    d.mkdir()
    (d / "gw.pem").write_bytes(gw.pem())
    (d / "gw.key").write_bytes(gw.key_pem())
    (d / "root.pem").write_bytes(root.pem())
    return root, gw, carl


def _client(ns: nsutil.Netns, addr: str, gw: str, who: str, root: Issued, carl: Issued) -> sw.StrongSwan:
    common = dict(local=addr, remote=gw, local_ts="dynamic", remote_ts="10.1.0.0/16", conn="rw", child="net",
                  conn_extra={"vips": "0.0.0.0"}, plugins=PLUGINS)  # fmt: skip
    if who == "carl":
        return sw.StrongSwan(ns, psk="unused", local_auth={"auth": "pubkey", "certs": "carl.pem"},
                             remote_auth={"auth": "pubkey", "id": "gw.example"},
                             files={"x509ca/root.pem": root.pem(), "x509/carl.pem": carl.pem(),
                                    "private/carl.pem": carl.key_pem()}, **common)  # type: ignore[arg-type]  # fmt: skip
    psk = PSK_A if who == "client-a@example" else PSK_B
    return sw.StrongSwan(ns, psk=psk, local_id=who, remote_id="gw.example", **common)  # type: ignore[arg-type]


def _installed(out: str) -> dict[str, tuple[str, list[str]]]:
    """conn -> (the client's virtual IP, our local TS) from ipsecstack's 'child sa installed' lines."""
    found = {}
    for line in out.splitlines():
        if "child sa installed" not in line:
            continue
        conn = re.search(r"\bconn=([\w-]+)", line)
        vip = re.search(r"remote_ts=\['([\d.]+)/32'\]", line)
        local = re.search(r"local_ts=\[([^\]]*)\]", line)
        if conn and vip and local:
            found[conn.group(1)] = (vip.group(1), re.findall(r"'([^']+)'", local.group(1)))
    return found


def test_three_clients_each_get_their_profile(tmp_path: Path) -> None:
    _require()
    root, _gw, carl = _pki(tmp_path)
    with nsutil.netns_hub("pf", spokes=3) as net:
        (tmp_path / "gw.toml").write_text(CONFIG.format(gw=net.addr, psk_a=PSK_A, psk_b=PSK_B))
        d = Daemon(net.hub, tmp_path / "gw.toml")
        clients = [_client(ns, addr, net.addr, who, root, carl)
                   for ns, addr, (who, *_) in zip(net.spokes, net.spoke_addrs, CLIENTS, strict=True)]  # fmt: skip
        try:
            # charon with kernel-libipsec puts no virtual IP on an interface and then finds no source address
            # for its route: each client's address is added beforehand (the pools hand out their first address)
            for ns, (_, _, vip, _) in zip(net.spokes, CLIENTS, strict=True):
                ns.run("ip", "addr", "add", f"{vip}/32", "dev", "lo")
            starters = [threading.Thread(target=c.start) for c in clients]
            for t in starters:
                t.start()
            nsutil.wait_for(d.started, timeout=20, what=f"ipsecstack to start\n{d.output()}")
            for t in starters:
                t.join(timeout=20)
            assert all(c.running for c in clients), [c.log_tail(20) for c in clients]
            # all three at once
            errors: list[BaseException] = []

            def initiate(c: sw.StrongSwan) -> None:
                try:
                    c.initiate("net", timeout=15)
                except BaseException as e:  # reported below, with the daemon's output
                    errors.append(e)

            threads = [threading.Thread(target=initiate, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=25)
            assert not errors, f"{errors}\n{d.output()}"
            nsutil.wait_for(lambda: len(_installed(d.output())) == 3, timeout=10,
                            what=f"three child SAs\n{d.output()}")  # fmt: skip
            installed = _installed(d.output())
            out = d.output()
            for c, (_who, conn, vip, lan) in zip(clients, CLIENTS, strict=True):
                assert installed[conn] == (vip, [lan]), (conn, installed)
                ike_sa, child = c.wait_established(timeout=10)
                assert vip in str(ike_sa.info.get("local-vips")), ike_sa.info
                assert child.info["local-ts"] == [f"{vip}/32"] and child.info["remote-ts"] == [lan], child.info
                r = c.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-I", vip, "10.1.0.1", check=False, timeout=15)
                assert r.returncode == 0, r.stdout.decode() + r.stderr.decode() + c.log_tail(30)
            established = [line for line in out.splitlines() if "ike sa established" in line]
            assert any("conn=psk-b" in e and "switched_from=psk-a" in e for e in established), established
            assert any("conn=certs" in e and "peer_cert_issuer" in e for e in established), established
            assert PSK_A not in out and PSK_B not in out
        finally:
            for c in clients:
                c.stop()
            assert d.terminate() == 0, d.output()
