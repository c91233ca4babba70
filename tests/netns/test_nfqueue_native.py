"""Transport mode over NFQUEUE carried by the native engine's threads (issue #10), on the real kernel.

Two namespaces joined by a veth with a 9000-byte MTU, each running ``ipsecstack run`` with manual ESP SAs
in transport mode and the native datapath (the agent hands the bound queues' netlink sockets to
``Engine.nfq_start``). Pings of every size class from 64 bytes to jumbo frames and a TCP transfer both
ways must arrive, only ESP on the wire, and the engine's counters (the ``forwarder`` entry of the
node's final counters, logged at SIGTERM) must show that its threads, not Python, gave the verdicts, and
that the receiving in queue coalesced in-order TCP segments ([agent] offloads, on by default).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_transport_nfqueue import Capture, assert_transfer_ok, start_agents, stop, transfer

DATAPATH_ENGINES = ("native",)  # what is asserted is the engine's own work
pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

PING_SIZES = (56, 1000, 1472, 2000, 4000, 8000, 8900)  # ICMP payload: 84- to 8928-byte IP packets


def _final_counters(stderr: str) -> dict[str, object]:
    for line in stderr.splitlines():
        if '"node stopped"' in line:
            return json.loads(line)  # type: ignore[no-any-return]
    raise AssertionError(f"no 'node stopped' line in the agent's log:\n{stderr[-3000:]}")


def test_native_threads_carry_pings_of_all_sizes_and_tcp(tmp_path: Path) -> None:
    with nsutil.netns_pair("nn", mtu=9000) as pair:
        a, b = start_agents(pair, tmp_path)
        try:
            cap = Capture(pair.a, tmp_path / "native.pcap")
            for size in PING_SIZES:
                r = pair.a.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(size), pair.addr_b,
                               check=False, timeout=20)  # fmt: skip
                got = re.search(r"(\d+) received", r.stdout.decode())
                assert got and int(got.group(1)) == 3, (size, r.stdout.decode(), r.stderr.decode())
            res = transfer(pair)
            cap.stop()
            assert_transfer_ok(res)
            protos = cap.protocols(pair.addr_a, pair.addr_b)
            assert protos[50] > 1000 and protos[6] == 0 and protos[1] == 0, protos
        finally:
            rc_a, err_a = stop(a)
            rc_b, err_b = stop(b)
        assert rc_a == 0 and rc_b == 0, err_a[-2000:] + err_b[-2000:]
        # b's inbound thread took the 3 MiB upload from its raw ESP socket and wrote it into the inject TUN,
        # in-order segments of a round as one super-packet
        merged = _final_counters(err_b)["forwarder"]["coalesced"]  # type: ignore[index]
        assert merged["segments"] > merged["writes"] > 0, merged
        for err in (err_a, err_b):
            counters = _final_counters(err)
            assert counters["datapath"] == "native", counters
            fwd = counters["forwarder"]
            assert isinstance(fwd, dict), counters
            nfq = fwd["nfq"]
            assert nfq["queues"] == 3 and nfq["malformed"] == 0 and nfq["tx_errors"] == 0, fwd
            assert nfq["truncated"] == 0 and nfq["kernel_errors"] == 0, fwd
            # the engine protected and decrypted (nearly) everything itself; Python saw each flow's first packet
            carried = fwd["out_packets"] + fwd["in_packets"]
            assert fwd["out_packets"] > 200 and fwd["in_packets"] > 200, fwd
            assert nfq["python_verdicts"] < 40 and carried > 20 * nfq["python_verdicts"], fwd
            assert fwd["punt_dropped"] == 0, fwd
            # the peers' ESP came by the raw socket, never by the in queue (each flow's first packet: "in")
            assert nfq["qin"] == 0 and fwd["punts"]["in"] >= 1 and fwd["rx_errors"]["esp4"] == 0, fwd
            # the TCP queue took the host's TCP super-packets whole, cut them and sent the ESP packets itself
            tcpq = nfq["tcp_queue"]
            assert tcpq["segments"] > tcpq["super"] > 0 and tcpq["raw_sent"] > tcpq["segments"], fwd
            assert fwd["tx_errors"]["raw4"] == 0, fwd


MSS_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, int(sys.argv[3]))  # announced in the SYN-ACK
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(20)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
print(n, flush=True)
"""

MSS_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(bytes(int(sys.argv[3])))
c.close()
"""


def test_tcp_queue_segments_stay_within_the_peers_mss(tmp_path: Path) -> None:
    """The kernel hands the TCP queue super-packets without their segment size: the engine cuts them to
    fit the path MTU (9000 here) and never above the MSS the peer announced (RFC 9293 §3.7.1)."""
    import sys

    from tests.netns.test_transport_nfqueue import _readline

    mss, size = 1000, 4 << 20
    with nsutil.netns_pair("nm", mtu=9000) as pair:
        a, b = start_agents(pair, tmp_path)
        try:
            cap = Capture(pair.a, tmp_path / "mss.pcap")
            server = pair.b.popen(sys.executable, "-c", MSS_SERVER, pair.addr_b, "5301", str(mss))
            try:
                assert _readline(server) == b"ready\n"
                pair.a.run(sys.executable, "-c", MSS_CLIENT, pair.addr_b, "5301", str(size), timeout=60)
                assert _readline(server, timeout=20) == f"{size}\n".encode()
            finally:
                if server.poll() is None:
                    server.kill()
                server.wait(timeout=5)
            cap.stop()
        finally:
            rc_a, err_a = stop(a)
            rc_b, err_b = stop(b)
        assert rc_a == 0 and rc_b == 0, err_a[-2000:] + err_b[-2000:]
        tcpq = _final_counters(err_a)["forwarder"]["nfq"]["tcp_queue"]  # type: ignore[index]
        assert tcpq["segments"] > tcpq["super"] > 0, tcpq
        from scapy.layers.inet import IP
        from scapy.utils import rdpcap

        sizes = [p[IP].len for p in rdpcap(str(cap.path)) if IP in p and p[IP].src == pair.addr_a and p[IP].proto == 50]
        # IP 20 + ESP 8 + IV 8 + TCP 32 (timestamps) + at most mss - 12 of data + padding 3 + trailer 2 + ICV 16
        assert len(sizes) > size // mss // 2 and max(sizes) <= 20 + 8 + 8 + 32 + mss - 12 + 3 + 2 + 16, max(sizes)
