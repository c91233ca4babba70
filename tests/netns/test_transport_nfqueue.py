"""Transport mode through NFQUEUE on the real kernel: two namespaces, each running ``ipsecstack run``.

Every test builds its own pair of namespaces (``nsutil.netns_pair``) and removes it; agents, servers and
captures are stopped by PID. Traffic stays between the two veth addresses inside the namespaces.
"""

from __future__ import annotations

import hashlib
import json
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from backends.esp_routes import MARK
from backends.nfqueue import CHAIN_IN, CHAIN_MSS, CHAIN_OUT
from ipsecstack.agent.nfq_rules import plan_rules
from ipsecstack.config import build_datapath, parse
from tests.netns import nsutil

MARKER = b"IPSECSTACK-MARKER-7f3a9c"
PORT = 5201
UP_BYTES = 3 << 20  # a -> b
DOWN_BYTES = 1 << 20  # b -> a
KEYS = {
    "esp": (bytes(range(20)).hex(), bytes(range(100, 120)).hex()),
    "ah": (bytes(range(32)).hex(), bytes(range(100, 132)).hex()),
}

# Deterministic data with the marker every 32 KiB; the same function runs in the helper programs.
DATA_FN = """
import random
def data(seed, n, marker):
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += marker + rng.randbytes(32768 - len(marker))
    return bytes(out[:n])
"""

SERVER = (
    DATA_FN
    + """
import hashlib, json, socket, sys
addr, port, down = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
marker = sys.argv[4].encode()
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(20)
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(65536)
    if not d:
        break
    h.update(d)
    n += len(d)
c.sendall(data(2, down, marker))
c.close()
print(json.dumps({"rx_len": n, "rx_sha": h.hexdigest()}), flush=True)
"""
)

CLIENT = (
    DATA_FN
    + """
import hashlib, json, socket, sys
addr, port, up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
marker = sys.argv[4].encode()
try:
    c = socket.create_connection((addr, port), timeout=float(sys.argv[5]))
    c.settimeout(20)
    c.sendall(data(1, up, marker))
    c.shutdown(socket.SHUT_WR)
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
        n += len(d)
    print(json.dumps({"rx_len": n, "rx_sha": h.hexdigest()}))
except OSError as e:
    print(json.dumps({"error": repr(e)}))
"""
)


def _data(seed: int, n: int) -> bytes:
    ns: dict[str, object] = {}
    exec(DATA_FN, ns)
    return ns["data"](seed, n, MARKER)  # type: ignore[operator,no-any-return]


def _readline(p: subprocess.Popen[bytes], stream: str = "stdout", timeout: float = 10.0) -> bytes:
    """One line from a child's pipe, bounded in time."""
    f = getattr(p, stream)
    ready, _, _ = select.select([f], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from {p.args!r} within {timeout}s")
    return f.readline()  # type: ignore[no-any-return]


def _config(pair: nsutil.Pair, side: str, protocol: str, v6: bool, agent_extra: str) -> str:
    a, b = (pair.addr6_a, pair.addr6_b) if v6 else (pair.addr_a, pair.addr_b)
    local, remote = (a, b) if side == "a" else (b, a)
    k_ab, k_ba = KEYS[protocol]
    spi_out, spi_in, key_out, key_in = (0x1001, 0x2002, k_ab, k_ba) if side == "a" else (0x2002, 0x1001, k_ba, k_ab)
    return f"""
[agent]
inner_backend = "nfqueue"
outer_backend = "nfqueue"
log_format = "json"
{agent_extra}

[manual.host]
mode = "transport"
protocol = "{protocol}"
local_addrs = "{local}"
remote_addrs = "{remote}"
spi_in = {spi_in}
spi_out = {spi_out}
key_in = "{key_in}"
key_out = "{key_out}"
"""


def _save(ns: nsutil.Netns, v6: bool = False) -> str:
    return ns.run("ip6tables-save" if v6 else "iptables-save").stdout.decode()


def _ready(ns: nsutil.Netns, p: subprocess.Popen[bytes], v6: bool = False) -> bool:
    if p.poll() is not None:
        raise AssertionError(f"agent in {ns.name} exited {p.returncode}: {p.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    text = _save(ns, v6)
    return f"-j {CHAIN_OUT}" in text and f"-j {CHAIN_IN}" in text


def start_agent(
    pair: nsutil.Pair, side: str, tmp: Path, protocol: str = "esp", v6: bool = False, agent_extra: str = ""
) -> subprocess.Popen[bytes]:
    ns = pair.a if side == "a" else pair.b
    path = tmp / f"{side}-{protocol}{'-v6' if v6 else ''}.toml"
    path.write_text(_config(pair, side, protocol, v6, agent_extra))
    p = ns.ipsecstack("run", "-c", str(path))
    nsutil.wait_for(lambda: _ready(ns, p, v6), timeout=15, what=f"agent rules in {ns.name}")
    return p


def start_agents(
    pair: nsutil.Pair, tmp: Path, protocol: str = "esp", v6: bool = False, agent_extra: str = ""
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    return (
        start_agent(pair, "a", tmp, protocol, v6, agent_extra),
        start_agent(pair, "b", tmp, protocol, v6, agent_extra),
    )


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str]:
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate(timeout=5)
    return p.returncode, err.decode(errors="replace")


def transfer(pair: nsutil.Pair, v6: bool = False, connect_timeout: float = 10) -> dict[str, object]:
    """Client in a sends UP_BYTES to a server in b, which answers with DOWN_BYTES; both hash what they got."""
    dst = pair.addr6_b if v6 else pair.addr_b
    server = pair.b.popen(sys.executable, "-c", SERVER, dst, str(PORT), str(DOWN_BYTES), MARKER.decode())
    try:
        assert _readline(server) == b"ready\n"
        client = pair.a.run(
            sys.executable, "-c", CLIENT, dst, str(PORT), str(UP_BYTES), MARKER.decode(), str(connect_timeout),
            timeout=60,
        )  # fmt: skip
        result: dict[str, object] = {"client": json.loads(client.stdout)}
        if "error" not in result["client"]:  # type: ignore[operator]
            result["server"] = json.loads(_readline(server, timeout=20))
        return result
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)


def assert_transfer_ok(res: dict[str, object]) -> None:
    client, server = res["client"], res.get("server")
    assert server == {"rx_len": UP_BYTES, "rx_sha": hashlib.sha256(_data(1, UP_BYTES)).hexdigest()}, res
    assert client == {"rx_len": DOWN_BYTES, "rx_sha": hashlib.sha256(_data(2, DOWN_BYTES)).hexdigest()}, res


class Capture:
    """tcpdump on a's veth, written to a pcap file; stopped by PID."""

    def __init__(self, ns: nsutil.Netns, path: Path) -> None:
        self.path = path
        # a 32 MiB capture buffer: the native engine sends faster than a default-sized one is drained
        args = ["-i", "eth0", "-n", "-U", "--immediate-mode", "-B", "32768", "-s", "0", "-Z", "root", "-w", str(path)]
        self.p = ns.popen("tcpdump", *args)
        line = _readline(self.p, "stderr", timeout=10)
        assert b"listening on" in line, line

    def stop(self) -> bytes:
        time.sleep(0.3)  # let the last packets reach the file
        self.p.send_signal(signal.SIGTERM)
        self.p.communicate(timeout=10)
        return self.path.read_bytes()

    def protocols(self, a: str, b: str) -> Counter[int]:
        """IP protocol numbers (IPv6: first next header) of packets between a and b."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.utils import rdpcap

        seen: Counter[int] = Counter()
        for pkt in rdpcap(str(self.path)):
            for layer, field in ((IP, "proto"), (IPv6, "nh")):
                if layer in pkt and {pkt[layer].src, pkt[layer].dst} == {a, b}:
                    seen[int(getattr(pkt[layer], field))] += 1
        return seen


def chain_rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if "IPSECSTACK" in line]


# --- tests -------------------------------------------------------------------------------------------


def test_rules_plan_fail_closed_by_default() -> None:
    """No root needed: the planned NFQUEUE rules have --queue-bypass only when asked for."""
    cfg = parse(_config(nsutil.Pair(nsutil.Netns("x"), nsutil.Netns("y"), "192.0.2.1", "192.0.2.2", "", ""), "a",
                        "esp", False, ""))  # fmt: skip
    dp = build_datapath(cfg, 0.0)
    out, inn = dp.spd.policies("out"), dp.spd.policies("in")
    closed = plan_rules(out, inn, queue_out=10, queue_in=11)
    opened = plan_rules(out, inn, queue_out=10, queue_in=11, bypass=True)
    queued = [r for r in closed if "NFQUEUE" in r.args]
    assert len(queued) == 3 and not any("--queue-bypass" in r.args for r in closed)
    assert all("--queue-bypass" in r.args for r in opened if "NFQUEUE" in r.args)
    # protected packets we emit are returned before the queue rule; unprotected plaintext inbound is queued
    # after the ESP rule (the datapath drops it: policy_requires_protection)
    out_rules = [r.args for r in closed if r.chain == CHAIN_OUT]
    assert out_rules[0] == ("-p", "esp", "-j", "RETURN") and "NFQUEUE" in out_rules[-1]
    in_rules = [r.args for r in closed if r.chain == CHAIN_IN]
    assert "esp" in in_rules[0] and "NFQUEUE" in in_rules[0]
    assert "esp" not in in_rules[-1] and in_rules[-1][-4:] == ("-j", "NFQUEUE", "--queue-num", "11")


def test_rules_plan_tcp_queue() -> None:
    """No root needed: with the native engine's TCP queue, each PROTECT policy's TCP goes there, in its
    place of the policy order, the rest to the out queue, and the engine's own (marked) sends return."""
    cfg = parse(_config(nsutil.Pair(nsutil.Netns("x"), nsutil.Netns("y"), "192.0.2.1", "192.0.2.2", "", ""), "a",
                        "esp", False, ""))  # fmt: skip
    dp = build_datapath(cfg, 0.0)
    out, inn = dp.spd.policies("out"), dp.spd.policies("in")
    plain = plan_rules(out, inn, queue_out=10, queue_in=11)
    rules = plan_rules(out, inn, queue_out=10, queue_in=11, queue_tcp=12)
    out_rules = [r.args for r in rules if r.chain == CHAIN_OUT]
    assert out_rules[0] == ("-m", "mark", "--mark", hex(MARK), "-j", "RETURN")
    queued = [a for a in out_rules if "NFQUEUE" in a]
    assert queued[-2][-2:] == ("--queue-num", "12") and queued[-2][-6:-4] == ("-p", "tcp")
    assert queued[-1][-2:] == ("--queue-num", "10") and queued[-1][:-4] == queued[-2][:-6]
    # the inbound rules and everything else are the plan without the TCP queue
    assert [r for r in rules if r.chain != CHAIN_OUT] == [r for r in plain if r.chain != CHAIN_OUT]
    assert len(out_rules) == len([r for r in plain if r.chain == CHAIN_OUT]) + 2


@pytest.mark.root
def test_esp_tcp_transfer_is_encrypted(tmp_path: Path) -> None:
    """(a) a few MB over TCP arrive intact both ways; (b) the wire shows only ESP, never TCP or the marker."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path)
        cap = Capture(pair.a, tmp_path / "esp.pcap")
        res = transfer(pair)
        raw = cap.stop()
        assert_transfer_ok(res)
        protos = cap.protocols(pair.addr_a, pair.addr_b)
        assert protos[50] > (UP_BYTES + DOWN_BYTES) // 1500, protos
        assert protos[6] == 0, protos
        assert MARKER not in raw
        # the MSS clamp rule is in place and saw the SYN (1500 - 20 - 20 - 37 bytes of AES-GCM ESP overhead)
        assert "--set-mss 1423" in _save(pair.a)
        counters = pair.a.run("iptables", "-t", "mangle", "-L", CHAIN_MSS, "-v", "-n", "-x").stdout.decode()
        assert int(counters.splitlines()[2].split()[0]) >= 1, counters
        for p in (a, b):
            rc, err = stop(p)
            assert rc == 0, err


@pytest.mark.root
def test_ah_tcp_transfer_is_authenticated_not_encrypted(tmp_path: Path) -> None:
    """(c) with AH the wire shows protocol 51 and, since AH does not encrypt, the marker in clear."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path, protocol="ah")
        cap = Capture(pair.a, tmp_path / "ah.pcap")
        res = transfer(pair)
        raw = cap.stop()
        assert_transfer_ok(res)
        protos = cap.protocols(pair.addr_a, pair.addr_b)
        assert protos[51] > (UP_BYTES + DOWN_BYTES) // 1500, protos
        assert protos[6] == 0 and protos[50] == 0, protos
        assert MARKER in raw
        for p in (a, b):
            rc, err = stop(p)
            assert rc == 0, err


@pytest.mark.root
def test_ping_is_protected(tmp_path: Path) -> None:
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path)
        cap = Capture(pair.a, tmp_path / "ping.pcap")
        res = pair.a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", pair.addr_b, check=False, timeout=15)
        cap.stop()
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
        protos = cap.protocols(pair.addr_a, pair.addr_b)
        assert protos[50] >= 6 and protos[1] == 0, protos
        for p in (a, b):
            assert stop(p)[0] == 0


@pytest.mark.root
def test_sigterm_exits_zero_and_removes_every_rule(tmp_path: Path) -> None:
    """(d) SIGTERM: exit 0, no trace in iptables-save; the peer still running drops our plaintext."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        before = {ns.name: (_save(ns), _save(ns, v6=True)) for ns in (pair.a, pair.b)}
        a, b = start_agents(pair, tmp_path)
        assert_transfer_ok(transfer(pair))
        rc, err = stop(a)
        assert rc == 0, err
        assert "IPSECSTACK" not in _save(pair.a) + _save(pair.a, v6=True)
        # a now sends in clear; b (still protecting) refuses plaintext from a protected peer
        res = transfer(pair, connect_timeout=2)
        assert "error" in res["client"], res  # type: ignore[operator]
        rc, err = stop(b)
        assert rc == 0, err
        assert "policy_requires_protection" in err  # b's datapath saw a's plaintext and refused it
        for ns in (pair.a, pair.b):
            v4, v6 = _save(ns), _save(ns, v6=True)
            assert "IPSECSTACK" not in v4 + v6, v4 + v6
            assert chain_rules(v4) == chain_rules(before[ns.name][0]) == []
        # and with both agents gone the hosts talk in clear again (nothing left behind)
        assert_transfer_ok(transfer(pair))


@pytest.mark.root
def test_stale_rules_are_cleaned_after_kill9(tmp_path: Path) -> None:
    """(e) kill -9 leaves the rules; the next start logs and removes them, installs its own exactly once."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path)
        first = chain_rules(_save(pair.a)) + chain_rules(_save(pair.a, v6=True))
        rc, _ = stop(a, signal.SIGKILL)
        assert rc == -signal.SIGKILL
        assert chain_rules(_save(pair.a)) != []  # the crash left its rules behind
        a = start_agent(pair, "a", tmp_path)
        assert_transfer_ok(transfer(pair))
        again = chain_rules(_save(pair.a)) + chain_rules(_save(pair.a, v6=True))
        assert sorted(again) == sorted(first)
        assert _save(pair.a).count(f"-j {CHAIN_OUT}") == 1 and _save(pair.a).count(f"-j {CHAIN_IN}") == 1
        rc, err = stop(a)
        assert rc == 0, err
        assert "stale" in err
        assert stop(b)[0] == 0


@pytest.mark.root
def test_fail_closed_when_agent_is_down(tmp_path: Path) -> None:
    """(f) agent killed or hung, no queue_bypass: traffic to the peer is dropped, nothing leaves in clear."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path)
        cap = Capture(pair.a, tmp_path / "down.pcap")
        # hung agent: packets wait in the kernel queue, nothing is sent
        a.send_signal(signal.SIGSTOP)
        try:
            res = transfer(pair, connect_timeout=2)
            assert "error" in res["client"], res  # type: ignore[operator]
            ping = pair.a.run("ping", "-c", "2", "-i", "0.2", "-W", "1", pair.addr_b, check=False, timeout=10)
            assert ping.returncode != 0
        finally:
            a.send_signal(signal.SIGCONT)
        # crashed agent: no listener on the queue, the rules stay and drop
        stop(a, signal.SIGKILL)
        res = transfer(pair, connect_timeout=2)
        assert "error" in res["client"], res  # type: ignore[operator]
        raw = cap.stop()
        protos = cap.protocols(pair.addr_a, pair.addr_b)
        assert protos[6] == 0 and protos[1] == 0, protos
        assert MARKER not in raw
        assert stop(b)[0] == 0


@pytest.mark.root
def test_queue_bypass_fails_open(tmp_path: Path) -> None:
    """queue_bypass = true: with the agent killed the kernel lets plaintext through (the documented opt-in)."""
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a = start_agent(pair, "a", tmp_path, agent_extra="queue_bypass = true")
        assert "--queue-bypass" in _save(pair.a)
        stop(a, signal.SIGKILL)
        assert_transfer_ok(transfer(pair))


@pytest.mark.root
def test_ipv6_esp_transfer(tmp_path: Path) -> None:
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        a, b = start_agents(pair, tmp_path, v6=True)
        cap = Capture(pair.a, tmp_path / "v6.pcap")
        res = transfer(pair, v6=True)
        raw = cap.stop()
        assert_transfer_ok(res)
        protos = cap.protocols(pair.addr6_a, pair.addr6_b)
        assert protos[50] > (UP_BYTES + DOWN_BYTES) // 1500 and protos[6] == 0, protos
        assert MARKER not in raw
        for p in (a, b):
            rc, err = stop(p)
            assert rc == 0, err
        assert "IPSECSTACK" not in _save(pair.a, v6=True) + _save(pair.b, v6=True)


# Runs inside a namespace: build the node from the config in argv[1] after breaking one precondition
# (argv[2]) and print the BackendError message.
PROBE = """
import os, sys
from pathlib import Path
from ipsecstack.config import parse
from ipsecstack.agent import build_node
from ipsecstack.runtime.io import BackendError
cfg = parse(Path(sys.argv[1]).read_text())
if sys.argv[2] == "nobody":
    # import what the backend needs first: the interpreter's stdlib may sit under /root (mode 700),
    # unreadable once we are nobody
    import backends.nfqueue  # noqa: F401
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
elif sys.argv[2] == "no-netfilterqueue":
    sys.modules["netfilterqueue"] = None
elif sys.argv[2] == "no-iptables":
    os.environ["PATH"] = "/nonexistent"
try:
    build_node(cfg)
except BackendError as e:
    print("ERROR", e)
else:
    print("OK")
"""


@pytest.mark.root
def test_backend_errors_say_what_is_missing(tmp_path: Path) -> None:
    nsutil.need_root()
    with nsutil.netns_pair("nq") as pair:
        path = tmp_path / "a.toml"
        path.write_text(_config(pair, "a", "esp", False, ""))

        def probe(how: str) -> str:
            res = pair.a.popen(sys.executable, "-c", PROBE, str(path), how)
            out, err = res.communicate(timeout=30)
            return out.decode() + err.decode()

        assert "needs root" in probe("nobody")
        assert "pip install 'ipsecstack[nfqueue]'" in probe("no-netfilterqueue")
        assert "iptables not found" in probe("no-iptables")
        assert "IPSECSTACK" not in _save(pair.a)  # none of these touched the firewall
        a = start_agent(pair, "a", tmp_path)
        rules = _save(pair.a)
        out = probe("as-is")
        assert "NFQUEUE 10 is already bound" in out, out
        assert chain_rules(_save(pair.a)) == chain_rules(rules)  # the running agent's rules were left alone
        assert stop(a)[0] == 0


def test_rules_plan_inject_dev() -> None:
    """No root needed: with the engine's inject TUN, what it gives the host is accepted first, the peers'
    ESP is accepted for the raw sockets instead of queued, and ESP in UDP and the rest are as before."""
    cfg = parse(_config(nsutil.Pair(nsutil.Netns("x"), nsutil.Netns("y"), "192.0.2.1", "192.0.2.2", "", ""), "a",
                        "esp", False, ""))  # fmt: skip
    dp = build_datapath(cfg, 0.0)
    out, inn = dp.spd.policies("out"), dp.spd.policies("in")
    plain = plan_rules(out, inn, queue_out=10, queue_in=11, queue_tcp=12, encap_ports=[4500])
    rules = plan_rules(out, inn, queue_out=10, queue_in=11, queue_tcp=12, inject_dev="ipsq11", encap_ports=[4500])
    in_rules = [r.args for r in rules if r.chain == CHAIN_IN]
    plain_in = [r.args for r in plain if r.chain == CHAIN_IN]
    assert in_rules[0] == ("-i", "ipsq11", "-j", "ACCEPT")
    esp = [a for a in in_rules if a[4:6] == ("-p", "esp")]
    assert esp and all(a[-2:] == ("-j", "ACCEPT") for a in esp), in_rules
    assert [a for a in in_rules if "udp" in a and "4500" in a] == [a for a in plain_in if "udp" in a and "4500" in a]
    assert [a for a in in_rules if "udp" in a and "4500" in a][-1][-4:] == ("-j", "NFQUEUE", "--queue-num", "11")
    # only the ESP rules' targets changed, and the inject rule came first
    assert len(in_rules) == len(plain_in) + 1
    assert [a for a in in_rules[1:] if a not in esp] == [a for a in plain_in if "esp" not in a[4:6]]
    assert [r for r in rules if r.chain != CHAIN_IN] == [r for r in plain if r.chain != CHAIN_IN]
