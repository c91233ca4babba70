"""The CLI against a running daemon (control socket), and tshark decrypting a capture with exported keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _capture, _ping

pytestmark = [pytest.mark.root]

CONFIG = """
[agent]
inner_backend = "tun"
outer_backend = "raw"
tun_name = "ipsec0"
tun_addrs = ["{tun_addr}"]
control_socket = "{sock}"
metrics = "127.0.0.1:9505"

[connections.site]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["aes128gcm16-prfsha256-x25519"]
local = {{ auth = "psk", id = "{local_id}" }}
remote = {{ auth = "psk", id = "{remote_id}" }}

[connections.site.children.net]
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
esp_proposals = ["{esp}"]
start_action = "{start}"

[secrets.ike.site]
secret = "tshark decryption test secret"
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsecstack", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("esp", ["aes256gcm16", "aes128-sha256"])
def test_cli_and_tshark_decryption(esp: str, tmp_path: Path, daemon_engine: str) -> None:
    if subprocess.run(["which", "tshark"], capture_output=True).returncode != 0:
        pytest.skip("tshark not installed (deploy/setup.sh test installs it)")
    with nsutil.netns_pair("ck") as pair:
        sock_a, sock_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
        for name, local, remote, tun, lnet, rnet, ids, start, sock in (
            ("a", pair.addr_a, pair.addr_b, "10.1.0.1/16", "10.1.0.0/16", "10.2.0.0/16", ("a.example", "b.example"),
             "none", sock_a),
            ("b", pair.addr_b, pair.addr_a, "10.2.0.1/16", "10.2.0.0/16", "10.1.0.0/16", ("b.example", "a.example"),
             "none", sock_b),
        ):  # fmt: skip
            (tmp_path / f"{name}.toml").write_text(CONFIG.format(
                tun_addr=tun, sock=sock, local=local, remote=remote, local_id=ids[0], remote_id=ids[1], lnet=lnet,
                rnet=rnet, esp=esp, start=start))  # fmt: skip
        da, db = Daemon(pair.a, tmp_path / "a.toml"), Daemon(pair.b, tmp_path / "b.toml")
        pcap = tmp_path / "wire.pcap"
        try:
            for d in (da, db):
                nsutil.wait_for(d.started, timeout=20, what=f"daemon in {d.ns.name}")
            nsutil.wait_for(lambda: Path(sock_a).exists(), timeout=10, what="control socket")
            conns = json.loads(cli("list-conns", "--socket", sock_a, "--json").stdout)
            assert conns[0]["name"] == "site" and conns[0]["up"] is False
            with _capture(pair.b, pcap):
                r = cli("initiate", "--socket", sock_a, "site")
                assert r.returncode == 0, r.stderr
                nsutil.wait_for(lambda: "child sa installed" in da.output(), timeout=20, what=da.output())
                _ping(pair, "10.1.0.1", "10.2.0.1")
            assert "UP" in cli("list-conns", "--socket", sock_a).stdout
            sas = json.loads(cli("list-sas", "-c", str(tmp_path / "a.toml"), "--json").stdout)
            child = sas[0]["children"][0]
            assert sas[0]["state"] == "established" and child["transform"] == esp and child["packets_out"] >= 3
            scrape = pair.a.run(sys.executable, "-c",
                                "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9505/metrics', "
                                "timeout=5).read().decode())")  # fmt: skip
            metrics = scrape.stdout.decode()
            assert 'ipsecstack_connection_up{connection="site"} 1.0' in metrics, metrics[:2000]
            assert 'ipsecstack_ike_sas{state="established"} 1.0' in metrics
            assert "ipsecstack_sa_packets_total" in metrics
            status = cli("status", "--socket", sock_a)
            assert status.returncode == 0 and "packets out" in status.stdout
            # the daemon runs the engine the default gave it, and says so (tests/engine_param.py)
            assert f"datapath: {daemon_engine}" in status.stdout, status.stdout
            doc = json.loads(cli("status", "--socket", sock_a, "--json").stdout)
            assert doc["datapath"] == daemon_engine
            if daemon_engine == "native":
                # TUN + raw/UDP on the native engine: its threads carry the packets, Python answered the first
                fwd = doc["forwarder"]
                assert fwd["running"] and fwd["out_packets"] >= 2 and fwd["in_packets"] >= 2, fwd
                assert sum(fwd["punts"].values()) <= 10 and fwd["punt_dropped"] == 0, fwd
                assert "forwarder: running, engine threads carried out" in status.stdout, status.stdout
                assert 'ipsecstack_forwarder_packets_total{direction="out"}' in metrics, metrics[-2000:]
            else:
                assert "forwarder" not in doc and "forwarder" not in status.stdout
            keydir = tmp_path / "keys"
            r = cli("keys", "--socket", sock_a, "--wireshark", str(keydir))
            assert r.returncode == 0, r.stderr
            esp_lines = (keydir / "esp_sa").read_text().splitlines()
            ike_lines = (keydir / "ikev2_decryption_table").read_text().splitlines()
            assert len(esp_lines) == 2 and len(ike_lines) == 1
            opts = ["-o", "esp.enable_encryption_decode:TRUE"]
            for line in esp_lines:
                opts += ["-o", f"uat:esp_sa:{line}"]
            opts += ["-o", f"uat:ikev2_decryption_table:{ike_lines[0]}"]
            icmp = subprocess.run(["tshark", "-r", str(pcap), *opts, "-Y", "icmp", "-T", "fields", "-e", "ip.src",
                                   "-e", "ip.dst"], capture_output=True, text=True, timeout=60)  # fmt: skip
            inner = {tuple(line.split("\t")[-1].split(",")[-1:]) for line in icmp.stdout.splitlines()}
            assert "10.1.0.1\t10.2.0.1" in icmp.stdout.replace(",", "\t") or any(
                "10.2.0.1" in x for t in inner for x in t
            ), icmp.stdout + icmp.stderr
            ike = subprocess.run(["tshark", "-r", str(pcap), *opts, "-Y", "isakmp.exchangetype == 35", "-V"],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            assert "a.example" in ike.stdout and "b.example" in ike.stdout, ike.stdout[-3000:] + ike.stderr
            r = cli("terminate", "--socket", sock_a, "site")
            assert r.returncode == 0 and json.loads(cli("terminate", "--socket", sock_a, "site", "--json").stdout)
            nsutil.wait_for(lambda: "peer deleted the IKE SA" in db.output(), timeout=10, what=db.output())
            bad = cli("initiate", "--socket", sock_a, "nope")
            assert bad.returncode == 1 and "no IKE connection named 'nope'" in bad.stderr
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0]
        assert not Path(sock_a).exists()
    gone = cli("status", "--socket", sock_a)
    assert gone.returncode == 3 and "cannot reach the daemon" in gone.stderr
