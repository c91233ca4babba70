"""Transport mode through NFQUEUE under load, as ``bench/bench_backends.py --only nfqueue`` drives it.

The benchmark's UDP floods stalled the agent for good: after an unlimited-rate flood the inbound
netlink socket overflowed, the kernel flagged ENOBUFS on it, uvloop (libuv) stopped polling the
descriptor on the resulting POLLERR, and with fail-closed rules every later packet, the next iperf3
run and any TCP connection included, was dropped. The agent now sets NETLINK_NO_ENOBUFS (and a larger
receive buffer). These tests flood back to back as the benchmark does, then require traffic to flow.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_transport_nfqueue import assert_transfer_ok, start_agents, stop, transfer

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def _iperf_udp(pair: nsutil.Pair, size: int, seconds: float, rate: str = "0") -> dict[str, object]:
    server = pair.b.popen("iperf3", "-s", "-1", "-B", pair.addr_b)
    try:
        time.sleep(0.3)
        r = pair.a.run("iperf3", "-c", pair.addr_b, "-u", "-b", rate, "-l", str(size), "-t", str(seconds), "-J",
                       "--connect-timeout", "5000", check=False, timeout=seconds + 25)  # fmt: skip
        return json.loads(r.stdout) if r.stdout else {"error": r.stderr.decode()}  # type: ignore[no-any-return]
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)
        pair.b.procs.remove(server)


def _ping(pair: nsutil.Pair) -> int:
    r = pair.a.run("ping", "-n", "-c", "5", "-i", "0.2", "-W", "1", pair.addr_b, check=False, timeout=20)
    m = re.search(r"(\d+) received", r.stdout.decode())
    return int(m.group(1)) if m else 0


def test_traffic_flows_after_back_to_back_udp_floods(tmp_path: Path) -> None:
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3 (deploy/setup.sh test installs it)")
    with nsutil.netns_pair("nl") as pair:
        a, b = start_agents(pair, tmp_path)
        try:
            for size, secs in ((36, 5), (484, 5), (1372, 3)):  # 64, 512 and 1400-byte IP packets, no rate limit
                res = _iperf_udp(pair, size, secs)
                assert "error" not in res, (size, res.get("error"))
                assert res["end"]["sum"]["packets"] > 100, res["end"]  # type: ignore[index]
            assert _ping(pair) >= 4, "protected traffic stalled after the floods"
            assert_transfer_ok(transfer(pair))
        finally:
            rc_a, err_a = stop(a)
            rc_b, err_b = stop(b)
        assert rc_a == 0 and rc_b == 0, err_a[-2000:] + err_b[-2000:]


PROBE = """
import socket, structlog
from backends.nfqueue import NETLINK_NO_ENOBUFS, SOL_NETLINK, NfqueuePort
port = NfqueuePort("probe", 31, lambda p: None, structlog.get_logger())
s = socket.socket(fileno=__import__("os").dup(port.fd))
print(s.getsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS), s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
s.close()
port.close()
"""


def test_queue_socket_never_reports_overflow_as_an_error() -> None:
    """The deterministic half of the above: the option that keeps uvloop polling is set on the queue socket."""
    import sys

    with nsutil.netns_pair("nq") as pair:
        r = pair.a.run("env", f"PYTHONPATH={nsutil.REPO}", sys.executable, "-c", PROBE, check=False)
        assert r.returncode == 0, r.stderr.decode()
        flag, rcvbuf = map(int, r.stdout.split())
        assert flag == 1 and rcvbuf >= 8 << 20, (flag, rcvbuf)
