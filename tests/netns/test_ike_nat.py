"""NAT traversal with the configuration a user writes: no ``[agent]`` backend keys at all.

Four namespaces: gateway B, a router R in front of it, site A behind R's NAT (MASQUERADE) and site C
routed by R without NAT::

    A (172.30.1.2) --- R: NAT --- (172.30.0.1) R (172.30.0.1) --- B (172.30.0.2)
    C (172.30.2.2) --- R: routed --------------------------------/

B runs one daemon with two connections, to A (which it sees as R's address, translated) and to C.
Expected, as a kernel IPsec stack does it: IKE floats to 4500 for A (RFC 7296 §2.23) and that SA
carries ESP in UDP (RFC 3948), while C's SA carries plain ESP (protocol 50), both at once on B's one
link; both tunnels pass traffic; NAT detection is reported as found (A: ``nat_local``; B:
``nat_remote`` for A, nothing for C) and no encapsulation is forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _capture

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

PSK = "nat traversal needs no backend keys"

SITE = """
[agent]
tun_addrs = ["{tun}"]
control_socket = "{sock}"

[connections.gw]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
local = {{ auth = "psk", id = "{id}.example" }}
remote = {{ auth = "psk", id = "b.example" }}

[connections.gw.children.net]
local_ts = ["{lnet}"]
remote_ts = ["10.2.0.0/16"]
start_action = "start"

[secrets.ike.gw]
secret = "{psk}"
"""

GATEWAY = """
[agent]
tun_addrs = ["10.2.0.1/16"]
control_socket = "{sock}"

[connections.a]
local_addrs = ["{local}"]
remote_addrs = ["{nat}"]
local = {{ auth = "psk", id = "b.example" }}
remote = {{ auth = "psk", id = "a.example" }}

[connections.a.children.net]
local_ts = ["10.2.0.0/16"]
remote_ts = ["10.1.0.0/16"]

[connections.c]
local_addrs = ["{local}"]
remote_addrs = ["{c}"]
local = {{ auth = "psk", id = "b.example" }}
remote = {{ auth = "psk", id = "c.example" }}

[connections.c.children.net]
local_ts = ["10.2.0.0/16"]
remote_ts = ["10.3.0.0/16"]

[secrets.ike.a]
secret = "{psk}"

[secrets.ike.c]
secret = "{psk}"
"""


@contextlib.contextmanager
def _topology() -> Iterator[dict[str, nsutil.Netns]]:
    nsutil.need_root()
    tag = f"{os.getpid() % 100000}"
    names = {k: nsutil.Netns(f"ipsnat{k}{tag}") for k in "abcr"}
    created: list[str] = []
    try:
        for ns in names.values():
            nsutil.run(["ip", "netns", "add", ns.name])
            created.append(ns.name)
            ns.run("ip", "link", "set", "lo", "up")
        r = names["r"]
        for k, net in (("b", "0"), ("a", "1"), ("c", "2")):
            ns = names[k]
            outer, inner = f"vn{k}{tag}", f"vr{k}{tag}"
            nsutil.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            nsutil.run(["ip", "link", "set", outer, "netns", ns.name])
            nsutil.run(["ip", "link", "set", inner, "netns", r.name])
            ns.run("ip", "link", "set", outer, "name", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")
            ns.run("ip", "addr", "add", f"172.30.{net}.2/24", "dev", "eth0")
            r.run("ip", "link", "set", inner, "name", f"eth{k}")
            r.run("ip", "link", "set", f"eth{k}", "up")
            r.run("ip", "addr", "add", f"172.30.{net}.1/24", "dev", f"eth{k}")
            ns.run("ip", "route", "add", "default", "via", f"172.30.{net}.1")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A is behind a NAT: everything it sends towards B leaves with R's address (and a new source port)
        r.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.30.1.0/24", "-o", "ethb", "-j",
              "MASQUERADE", "--random")  # fmt: skip
        yield names
    finally:
        for ns in names.values():
            ns.stop_all()
        for name in created:
            nsutil.run(["ip", "netns", "del", name], check=False)


def _list_sas(sock: Path) -> list[dict[str, object]]:
    r = nsutil.run([sys.executable, "-m", "ipsecstack", "list-sas", "--json", "--socket", str(sock)], check=False)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _ping(ns: nsutil.Netns, src: str, dst: str) -> None:
    r = ns.run("ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-I", src, dst, check=False, timeout=20)
    out = r.stdout.decode(errors="replace")
    m = re.search(r"(\d+) received", out)
    assert m is not None and int(m.group(1)) >= 4, f"ping {src} -> {dst}:\n{out}"


def _kinds(pcap: Path) -> dict[str, int]:
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    counts = {"esp_c": 0, "udp4500_a": 0, "esp_in_udp_a": 0, "other": 0}
    for pkt in rdpcap(str(pcap)):
        if IP not in pkt:
            continue
        ip = pkt[IP]
        peers = {ip.src, ip.dst}
        if ip.proto == 50:
            assert "172.30.2.2" in peers, f"plain ESP to the NATed site: {pkt!r}"
            counts["esp_c"] += 1
        elif ip.proto == 17 and UDP in pkt and 4500 in (pkt[UDP].sport, pkt[UDP].dport):
            assert "172.30.0.1" in peers, f"ESP in UDP to the site without NAT: {pkt!r}"
            counts["udp4500_a"] += 1
            if bytes(pkt[UDP].payload)[:4] != b"\0\0\0\0" and len(pkt[UDP].payload) > 1:
                counts["esp_in_udp_a"] += 1
        elif ip.proto == 1 and bytes(ip.payload)[:1] == b"\x03":
            counts["other"] += 1  # port unreachable: the delete of an IKE SA whose peer stopped first
        elif ip.proto in (1, 6) or (ip.proto == 17 and 500 not in (pkt[UDP].sport, pkt[UDP].dport)):
            raise AssertionError(f"plaintext on B's link: {pkt!r}")
        else:
            counts["other"] += 1  # IKE on 500
    return counts


def test_nat_and_no_nat_at_once_with_default_backends(tmp_path: Path) -> None:
    with _topology() as ns:
        socks = {k: tmp_path / f"{k}.sock" for k in "abc"}
        (tmp_path / "b.toml").write_text(GATEWAY.format(sock=socks["b"], local="172.30.0.2", nat="172.30.0.1",
                                                        c="172.30.2.2", psk=PSK))  # fmt: skip
        for k, net, link in (("a", "1", "1"), ("c", "3", "2")):
            site = SITE.format(tun=f"10.{net}.0.1/16", sock=socks[k], lnet=f"10.{net}.0.0/16", local=f"172.30.{link}.2",
                               remote="172.30.0.2", id=k, psk=PSK)  # fmt: skip
            (tmp_path / f"{k}.toml").write_text(site)
        pcap = tmp_path / "b.pcap"
        with _capture(ns["b"], pcap):
            db = Daemon(ns["b"], tmp_path / "b.toml")
            nsutil.wait_for(db.started, timeout=20, what="gateway B to start")
            da, dc = Daemon(ns["a"], tmp_path / "a.toml"), Daemon(ns["c"], tmp_path / "c.toml")
            try:
                for d in (da, dc):
                    nsutil.wait_for(lambda d=d: "child sa installed" in d.output(), timeout=25,
                                    what=f"child SA in {d.ns.name}:\n{d.output()}\nB:\n{db.output()}")  # fmt: skip
                _ping(ns["a"], "10.1.0.1", "10.2.0.1")
                _ping(ns["c"], "10.3.0.1", "10.2.0.1")
                sas_b = {e["name"]: e for e in _list_sas(socks["b"])}
                sas_a = _list_sas(socks["a"])[0]
                sas_c = _list_sas(socks["c"])[0]
            finally:
                codes = [d.terminate() for d in (da, dc, db)]
        assert codes == [0, 0, 0], db.output()
    # what NAT detection found, each side; nothing forced
    assert sas_a["nat_local"] and not sas_a["nat_remote"] and sas_a["encap"] and not sas_a["encap_forced"], sas_a
    assert sas_b["a"]["nat_remote"] and not sas_b["a"]["nat_local"] and sas_b["a"]["encap"], sas_b["a"]
    for e in (sas_b["c"], sas_c):
        assert not (e["nat_local"] or e["nat_remote"] or e["encap"] or e["encap_forced"]), e
    assert sas_b["a"]["remote_port"] != 500, sas_b["a"]  # floated (and translated by R)
    kinds = _kinds(pcap)
    assert kinds["esp_c"] >= 10 and kinds["esp_in_udp_a"] >= 10, kinds
