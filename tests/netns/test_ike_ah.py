"""IKE-negotiated AH (``ah_proposals``, RFC 4302) between two ipsecstack daemons in namespaces.

Transport mode over NFQUEUE (trap on A, acquire, negotiation) and tunnel mode over TUN + raw sockets.
The capture must show AH (IP protocol 51) for every packet between the hosts except IKE, no ESP; AH
does not encrypt, so the payload is visible, but scapy verifies the ICV of every captured AH packet
with the keys the daemon exports, and tshark dissects it as AH.

strongSwan cannot be the peer here: its userspace kernel-libipsec (the only strongSwan IPsec
backend usable in these namespaces) implements ESP only, so AH interop is between ipsecstack peers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _capture, _ping, _tcp_transfer

# AH runs on the Python transforms with either engine (the native engine implements ESP)
DATAPATH_ENGINES = ("default",)

pytestmark = [pytest.mark.root]

TRANSPORT = """
[agent]
inner_backend = "nfqueue"
outer_backend = "nfqueue"
log_level = "info"
control_socket = "{sock}"

[connections.host]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["aes128gcm16-prfsha256-x25519"]

[connections.host.children.h2h]
mode = "transport"
ah_proposals = ["{ah}"]
start_action = "{start}"

[secrets.ike.host]
secret = "AH transport mode shared secret"
"""

TUNNEL = """
[agent]
inner_backend = "tun"
outer_backend = "raw"
tun_name = "ipsec0"
tun_addrs = ["{tun_addr}"]
log_level = "info"
control_socket = "{sock}"

[connections.site]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["aes256-sha256-modp2048"]

[connections.site.children.net]
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
ah_proposals = ["{ah}"]
start_action = "{start}"

[secrets.ike.site]
secret = "AH tunnel mode shared secret"
"""

SCAPY_AUTH = {"sha256": "SHA2-256-128", "sha384": "SHA2-384-192", "sha512": "SHA2-512-256"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsecstack", *args], capture_output=True, text=True, timeout=30)


def _check_wire(pcap: Path, keys: dict[str, object], transform: str, mode: str) -> dict[str, int]:
    """Every packet between the hosts is IKE or AH (none ESP); scapy verifies each AH packet's ICV."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import AH
    from scapy.layers.ipsec import SecurityAssociation as ScapySA
    from scapy.utils import rdpcap

    sas = {}
    for k in keys["esp"]:  # type: ignore[union-attr]
        assert k["protocol"] == "ah" and k["transform"] == transform, k  # type: ignore[index]
        kw: dict[str, object] = {"auth_algo": SCAPY_AUTH[transform], "auth_key": bytes.fromhex(k["key"])}  # type: ignore[index]
        if mode == "tunnel":
            kw["tunnel_header"] = IP(src=k["src"], dst=k["dst"])  # type: ignore[index]
        sas[k["spi"]] = ScapySA(AH, spi=k["spi"], **kw)  # type: ignore[index]
    kinds = {"ah": 0, "ike": 0, "esp": 0, "other": 0}
    for pkt in rdpcap(str(pcap)):
        if IP not in pkt:
            continue
        ip = pkt[IP]
        if ip.proto == 51:
            kinds["ah"] += 1
            sa = sas.get(ip[AH].spi)
            assert sa is not None, f"AH with an unknown SPI 0x{ip[AH].spi:08x}"
            sa.decrypt(IP(bytes(ip)))  # raises unless the ICV verifies (RFC 4302 §3.4.4)
        elif ip.proto == 50:
            kinds["esp"] += 1
        elif UDP in ip and 500 in (ip[UDP].sport, ip[UDP].dport):
            kinds["ike"] += 1
        else:
            kinds["other"] += 1
            raise AssertionError(f"unprotected packet on the wire: {pkt.summary()}")
    assert kinds["esp"] == 0 and kinds["ike"] >= 4, kinds
    return kinds


def _tshark_ah(pcap: Path) -> None:
    if subprocess.run(["which", "tshark"], capture_output=True).returncode != 0:
        return
    ah = subprocess.run(["tshark", "-r", str(pcap), "-Y", "ah", "-T", "fields", "-e", "ah.spi"],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    esp = subprocess.run(["tshark", "-r", str(pcap), "-Y", "esp"], capture_output=True, text=True, timeout=60)
    assert ah.returncode == 0 and len(ah.stdout.split()) >= 6, ah.stdout + ah.stderr
    assert esp.returncode == 0 and esp.stdout.strip() == "", esp.stdout


@pytest.mark.parametrize("ah", ["sha256", "sha512-x25519"])
def test_ah_transport_mode_over_nfqueue(ah: str, tmp_path: Path) -> None:
    transform = ah.split("-")[0]
    with nsutil.netns_pair("ah") as pair:
        socks = {n: str(tmp_path / f"{n}.sock") for n in ("a", "b")}
        (tmp_path / "a.toml").write_text(TRANSPORT.format(local=pair.addr_a, remote=pair.addr_b, start="trap", ah=ah,
                                                          sock=socks["a"]))  # fmt: skip
        (tmp_path / "b.toml").write_text(TRANSPORT.format(local=pair.addr_b, remote=pair.addr_a, start="none", ah=ah,
                                                          sock=socks["b"]))  # fmt: skip
        db = Daemon(pair.b, tmp_path / "b.toml")
        da = Daemon(pair.a, tmp_path / "a.toml")
        pcap = tmp_path / "wire.pcap"
        try:
            for d in (da, db):
                nsutil.wait_for(d.started, timeout=20, what=f"ipsecstack in {d.ns.name}")
            with _capture(pair.b, pcap):
                # the first echo hits the trap (acquire); the SA is up before the later ones
                pair.a.run("ping", "-n", "-c", "2", "-W", "2", pair.addr_b, check=False, timeout=20)
                nsutil.wait_for(lambda: "child sa installed" in da.output(), timeout=20, what=da.output())
                r = pair.a.run("ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", pair.addr_b, check=False, timeout=20)
                assert r.returncode == 0 and b" 0% packet loss" in r.stdout, r.stdout + db.output().encode()
                nbytes, _ = _tcp_transfer(pair, pair.addr_b)
                assert nbytes > 1 << 20
            out_a = da.output()
            assert "acquire" in out_a and "mode=transport" in out_a and f"transform={transform}" in out_a, out_a
            sas = json.loads(cli("list-sas", "--socket", socks["a"], "--json").stdout)
            (child,) = sas[0]["children"]
            assert (child["protocol"], child["transform"], child["mode"]) == ("ah", transform, "transport")
            assert child["packets_out"] > 5 and child["packets_in"] > 5
            assert f"h2h: transport ah {transform} in " in cli("list-sas", "--socket", socks["a"]).stdout
            keys = json.loads(cli("keys", "--socket", socks["b"], "--json").stdout)
            kinds = _check_wire(pcap, keys, transform, "transport")
            assert kinds["ah"] > 100, kinds
            _tshark_ah(pcap)
            r = cli("keys", "--socket", socks["b"], "--wireshark", str(tmp_path / "keys"))
            assert r.returncode == 0 and (tmp_path / "keys" / "esp_sa").read_text() == ""  # AH: nothing to decrypt
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        for ns in (pair.a, pair.b):
            assert "IPSECSTACK" not in ns.run("iptables-save").stdout.decode()


def test_ah_tunnel_mode_over_tun_and_raw_sockets(tmp_path: Path) -> None:
    with nsutil.netns_pair("at") as pair:
        socks = {n: str(tmp_path / f"{n}.sock") for n in ("a", "b")}
        (tmp_path / "a.toml").write_text(TUNNEL.format(local=pair.addr_a, remote=pair.addr_b, tun_addr="10.1.0.1/16",
                                                       lnet="10.1.0.0/16", rnet="10.2.0.0/16", start="start",
                                                       ah="sha384", sock=socks["a"]))  # fmt: skip
        (tmp_path / "b.toml").write_text(TUNNEL.format(local=pair.addr_b, remote=pair.addr_a, tun_addr="10.2.0.1/16",
                                                       lnet="10.2.0.0/16", rnet="10.1.0.0/16", start="none",
                                                       ah="sha384", sock=socks["b"]))  # fmt: skip
        db = Daemon(pair.b, tmp_path / "b.toml")
        nsutil.wait_for(db.started, timeout=20, what="responder to start")
        da = Daemon(pair.a, tmp_path / "a.toml")
        pcap = tmp_path / "wire.pcap"
        try:
            with _capture(pair.b, pcap):
                for d in (da, db):
                    nsutil.wait_for(lambda d=d: "child sa installed" in d.output(), timeout=20,
                                    what=f"child SA in {d.ns.name}:\n{d.output()}")  # fmt: skip
                _ping(pair, "10.1.0.1", "10.2.0.1")
                nbytes, _ = _tcp_transfer(pair, "10.2.0.1")
                assert nbytes > 1 << 20
            keys = json.loads(cli("keys", "--socket", socks["b"], "--json").stdout)
            kinds = _check_wire(pcap, keys, "sha384", "tunnel")
            assert kinds["ah"] > 100, kinds  # (tcpdump may hand over the last second's packets too late)
            sas = json.loads(cli("list-sas", "--socket", socks["a"], "--json").stdout)
            assert sas[0]["children"][0]["protocol"] == "ah" and sas[0]["children"][0]["mode"] == "tunnel"
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
