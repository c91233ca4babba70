"""IKEv2 in transport mode between two ipsecstack hosts, NFQUEUE on both (libipsec cannot do this).

Host A has a trap policy (``start_action = "trap"``): the first TCP segment to B hits it, the datapath
raises an acquire, A negotiates with B, and the retransmitted SYN finds the child SA. The transfer is
checked end to end, and the wire carries only IKE (UDP 500) and ESP between the hosts.

The configuration names no backend: a transport-mode child means NFQUEUE on both planes
(``config.resolve_backends``). Before that rule the default TUN backend was started, the child SA was
reported installed and the hosts' traffic flowed in clear.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_tunnel import MARKER, Daemon, _capture, _tcp_transfer

pytestmark = [pytest.mark.root]

CONFIG = """
[agent]
log_level = "info"

[connections.host]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["aes256gcm16-prfsha384-ecp384"]

[connections.host.children.h2h]
mode = "transport"
esp_proposals = ["aes256gcm16"]
start_action = "{start}"

[secrets.ike.host]
secret = "transport mode shared secret"
"""


def test_ike_transport_mode_with_acquire(tmp_path: Path) -> None:
    with nsutil.netns_pair("it") as pair:
        (tmp_path / "a.toml").write_text(CONFIG.format(local=pair.addr_a, remote=pair.addr_b, start="trap"))
        (tmp_path / "b.toml").write_text(CONFIG.format(local=pair.addr_b, remote=pair.addr_a, start="none"))
        db = Daemon(pair.b, tmp_path / "b.toml")
        da = Daemon(pair.a, tmp_path / "a.toml")
        try:
            for d in (da, db):
                nsutil.wait_for(d.started, timeout=20, what=f"ipsecstack in {d.ns.name}")
            assert "ike initiating" not in da.output()  # trap: nothing happens before traffic
            pcap = tmp_path / "wire.pcap"
            with _capture(pair.b, pcap):
                try:
                    nbytes, _ = _tcp_transfer(pair, pair.addr_b)
                except Exception as e:
                    raise AssertionError(f"{e}\n--- A ---\n{da.output()}\n--- B ---\n{db.output()}") from None
            assert nbytes > 1 << 20
            assert "acquire" in da.output() and "child sa installed" in da.output(), da.output()
            assert "mode=transport" in da.output()
            raw = pcap.read_bytes()
            assert MARKER not in raw
            from scapy.layers.inet import IP, TCP, UDP
            from scapy.utils import rdpcap

            kinds = {"esp": 0, "ike": 0, "other": 0}
            for pkt in rdpcap(str(pcap)):
                if IP not in pkt:
                    continue
                if pkt[IP].proto == 50:
                    kinds["esp"] += 1
                elif UDP in pkt and 500 in (pkt[UDP].sport, pkt[UDP].dport):
                    kinds["ike"] += 1
                else:
                    assert TCP not in pkt, f"plaintext TCP on the wire: {pkt.summary()}"
                    kinds["other"] += 1
            assert kinds["esp"] > 100 and kinds["ike"] >= 4 and kinds["other"] == 0, kinds
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        for ns in (pair.a, pair.b):
            assert "IPSECSTACK" not in ns.run("iptables-save").stdout.decode()
