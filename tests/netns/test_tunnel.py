"""Tunnel mode through the real kernel: two namespaces, each running ``ipsecstack run``.

Each side has a TUN device (inner plane) and a raw ESP or ESP-in-UDP socket on its veth (outer
plane). The tests ping and stream a few MB of TCP through the tunnel and check, in a capture of
the veth, that the wire carries only ESP (or ESP-in-UDP) and never the inner plaintext.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import nsutil

pytestmark = [pytest.mark.root]

TUN = "ipsec0"
MARKER = b"IPSECSTACK-PLAINTEXT-MARKER-7f3a"
PAYLOAD_SIZE = 4 << 20
TCP_PORT = 5201

CONFIG = """
[agent]
inner_backend = "tun"
outer_backend = "{outer}"
tun_name = "{tun}"
tun_addrs = ["{tun_addr}"]
log_level = "info"

[manual.site]
mode = "tunnel"
transform = "{transform}"
local_addrs = "{local}"
remote_addrs = "{remote}"
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
spi_in = {spi_in}
spi_out = {spi_out}
key_in = "{key_in}"
key_out = "{key_out}"
encap = {encap}
"""

# Runs inside B: accept one connection, read to EOF (bounded), print byte count and SHA-256.
SERVER = """
import hashlib, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(20)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(10)
h, n, deadline = hashlib.sha256(), 0, time.monotonic() + 30
while time.monotonic() < deadline:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
conn.close()
print(n, h.hexdigest(), flush=True)
"""

# Runs inside A: connect (retrying while the server starts, bounded), send stdin, print SHA-256.
CLIENT = """
import hashlib, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
data = sys.stdin.buffer.read()
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
s.settimeout(20)
t0 = time.monotonic()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)  # EOF: the server has read everything
elapsed = time.monotonic() - t0
s.close()
print(len(data), hashlib.sha256(data).hexdigest(), elapsed, flush=True)
"""


@dataclass(frozen=True)
class Variant:
    id: str
    outer: str  # "raw" | "udp"
    ipv6_outer: bool
    ipv6_inner: bool
    transform: str
    key_len: int


VARIANTS = [
    Variant("raw-ipv4-aes128gcm16", "raw", False, False, "aes128gcm16", 20),
    Variant("udp-ipv4-aes256-sha256", "udp", False, False, "aes256-sha256", 64),
    Variant("raw-ipv6-chacha20poly1305", "raw", True, True, "chacha20poly1305", 36),
    Variant("udp-ipv6-aes256gcm16", "udp", True, True, "aes256gcm16", 36),
]


class Daemon:
    """An ``ipsecstack run`` process in a namespace whose output is drained by a thread (no pipe stalls)."""

    def __init__(self, ns: nsutil.Netns, config: Path) -> None:
        self.ns = ns
        self.proc = ns.ipsecstack("run", "-c", str(config))
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._drain, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: object) -> None:
        read = stream.read1  # type: ignore[attr-defined]
        for _ in range(1_000_000):  # bounded; ends at EOF when the process exits
            chunk = read(65536)
            if not chunk:
                return
            with self._lock:
                self._buf += chunk

    def output(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def started(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"ipsecstack exited with {self.proc.returncode}:\n{self.output()}")
        return "node started" in self.output()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"ipsecstack did not stop on SIGTERM:\n{self.output()}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc


def _link_exists(ns: nsutil.Netns, name: str) -> bool:
    return ns.run("ip", "link", "show", name, check=False).returncode == 0


def _configs(v: Variant, pair: nsutil.Pair) -> tuple[str, str, str, str]:
    """(config A, config B, inner address of A, inner address of B)."""
    la, lb = (pair.addr6_a, pair.addr6_b) if v.ipv6_outer else (pair.addr_a, pair.addr_b)
    if v.ipv6_inner:
        ia, ib, na, nb = "fd01::1/64", "fd02::1/64", "fd01::/64", "fd02::/64"
    else:
        ia, ib, na, nb = "10.1.0.1/16", "10.2.0.1/16", "10.1.0.0/16", "10.2.0.0/16"
    k1, k2 = "a5" * v.key_len, "3c" * v.key_len
    common = dict(outer=v.outer, tun=TUN, transform=v.transform, encap=str(v.outer == "udp").lower())
    a = CONFIG.format(**common, tun_addr=ia, local=la, remote=lb, lnet=na, rnet=nb,
                      spi_in=0x2001, spi_out=0x1001, key_in=k2, key_out=k1)  # fmt: skip
    b = CONFIG.format(**common, tun_addr=ib, local=lb, remote=la, lnet=nb, rnet=na,
                      spi_in=0x1001, spi_out=0x2001, key_in=k1, key_out=k2)  # fmt: skip
    return a, b, ia.split("/")[0], ib.split("/")[0]


@dataclass
class Tunnel:
    pair: nsutil.Pair
    inner_a: str
    inner_b: str
    daemons: list[Daemon]


@contextlib.contextmanager
def _tunnel(v: Variant, tmp: Path) -> Iterator[Tunnel]:
    """Two namespaces with a daemon each; on exit the daemons get SIGTERM and must exit 0 and remove the TUN."""
    with nsutil.netns_pair("tn") as pair:
        cfg_a, cfg_b, inner_a, inner_b = _configs(v, pair)
        (tmp / "a.toml").write_text(cfg_a)
        (tmp / "b.toml").write_text(cfg_b)
        daemons = [Daemon(pair.a, tmp / "a.toml"), Daemon(pair.b, tmp / "b.toml")]
        try:
            for d in daemons:
                nsutil.wait_for(d.started, timeout=20, what=f"ipsecstack in {d.ns.name} to start")
                assert _link_exists(d.ns, TUN)
            yield Tunnel(pair, inner_a, inner_b, daemons)
        finally:
            codes = [d.terminate() for d in daemons]
        for d, rc in zip(daemons, codes, strict=True):
            assert rc == 0, f"ipsecstack in {d.ns.name} exited with {rc}:\n{d.output()}"
            assert "node stopped" in d.output()
            nsutil.wait_for(lambda d=d: not _link_exists(d.ns, TUN), timeout=5, what="the TUN device to go")


def _payload() -> bytes:
    rng = random.Random(20261128)
    parts = []
    for _ in range(PAYLOAD_SIZE // (64 << 10)):
        parts.append(rng.randbytes((64 << 10) - len(MARKER)))
        parts.append(MARKER)
    return b"".join(parts)


def _ping(pair: nsutil.Pair, src: str, dst: str) -> None:
    fam = "-6" if ":" in dst else "-4"
    # DSCP EF (0xb8): the outer header must carry it (RFC 4301 §5.1.2, copied by default); see _check_capture
    ping = ("ping", fam, "-n", "-c", "4", "-i", "0.2", "-W", "2", "-Q", "0xb8", "-I", src, dst)
    r = pair.a.run(*ping, check=False, timeout=20)
    out = r.stdout.decode(errors="replace")
    m = re.search(r"(\d+) received", out)
    assert r.returncode == 0 and m is not None, f"ping {src} -> {dst} failed:\n{out}{r.stderr.decode()}"
    assert int(m.group(1)) >= 3, out  # the first echo may wait for neighbour resolution; the rest must arrive


def _tcp_transfer(pair: nsutil.Pair, dst: str) -> tuple[int, float]:
    """Stream the payload A -> B through the tunnel; returns (bytes, seconds) after checking both digests.

    The client does not bind: the route into the TUN device makes the TUN address its source."""
    data = _payload()
    want = hashlib.sha256(data).hexdigest()
    server = pair.b.popen(sys.executable, "-c", SERVER, dst, str(TCP_PORT))
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "listening" (the server's accept has its own timeout)
        assert line.strip() == b"listening", line + server.stderr.read() if server.stderr else line
        client = pair.a.run(sys.executable, "-c", CLIENT, dst, str(TCP_PORT), input=data, timeout=40)
        out, err = server.communicate(timeout=40)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    n_sent, sent_hash, elapsed = client.stdout.decode().split()
    n_got, got_hash = out.decode().split()
    assert int(n_sent) == int(n_got) == len(data), (client.stdout, out, err)
    assert sent_hash == got_hash == want
    return len(data), float(elapsed)


@contextlib.contextmanager
def _capture(ns: nsutil.Netns, path: Path) -> Iterator[None]:
    """tcpdump on the namespace's eth0 for the duration of the block (packet-buffered, full snaplen)."""
    proc = ns.popen("tcpdump", "-i", "eth0", "-n", "-U", "-s", "0", "-B", "32768", "-Z", "root", "-w", str(path))
    try:
        nsutil.wait_for(lambda: path.exists() or proc.poll() is not None, timeout=10, what="tcpdump to start")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "tcpdump exited"
        time.sleep(0.2)  # the capture file appears as the capture starts; give the ring a moment
        yield
    finally:
        time.sleep(0.3)  # the last packets of the exchange
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)


def _check_capture(path: Path, v: Variant, min_protected: int) -> dict[str, int]:
    # min_protected: bytes. Counted in bytes, not packets: with the native forwarder's UDP GSO (fwd.h) one
    # captured ESP-in-UDP datagram on the veth is a run of ESP packets the kernel has not cut yet
    """Only ESP / ESP-in-UDP (and link housekeeping: ARP, neighbour discovery) on the wire; no plaintext."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
    from scapy.utils import rdpcap

    raw = path.read_bytes()
    assert MARKER not in raw, "the plaintext marker appears on the wire"
    inner_nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fd01::/16", "fd02::/16")]
    counts = {"esp": 0, "esp_in_udp": 0, "housekeeping": 0, "dscp_ef": 0, "protected_bytes": 0}
    for pkt in rdpcap(str(path)):
        if IP in pkt:
            hdr, proto, upper = pkt[IP], pkt[IP].proto, pkt[IP].payload
        elif IPv6 in pkt:
            hdr, proto, upper = pkt[IPv6], pkt[IPv6].nh, pkt[IPv6].payload
            for _ in range(8):  # skip extension headers (MLD reports carry hop-by-hop options)
                if not isinstance(upper, IPv6ExtHdrHopByHop | IPv6ExtHdrDestOpt | IPv6ExtHdrRouting):
                    break
                proto, upper = upper.nh, upper.payload
        else:
            counts["housekeeping"] += 1  # ARP
            continue
        for addr in (hdr.src, hdr.dst):
            assert not any(ipaddress.ip_address(addr) in n for n in inner_nets), f"inner address on the wire: {pkt!r}"
        if proto in (17, 50) and (hdr.tos if IP in pkt else hdr.tc) >> 2 == 46:
            counts["dscp_ef"] += 1
        if proto == 50:
            assert v.outer == "raw", f"plain ESP in an ESP-in-UDP tunnel: {pkt!r}"
            counts["esp"] += 1
            counts["protected_bytes"] += len(bytes(upper))
        elif proto == 17 and UDP in pkt and 4500 in (pkt[UDP].sport, pkt[UDP].dport):
            assert v.outer == "udp", f"ESP-in-UDP in a raw ESP tunnel: {pkt!r}"
            counts["esp_in_udp"] += 1
            counts["protected_bytes"] += len(bytes(upper))
        elif proto == 58 and 130 <= bytes(upper)[0] <= 143:
            counts["housekeeping"] += 1  # ICMPv6 MLD / router and neighbour discovery
        else:
            raise AssertionError(f"unexpected packet on the wire: {pkt!r}")
        assert (IP in pkt) != v.ipv6_outer or proto == 58
    assert counts["protected_bytes"] >= min_protected, counts
    assert counts["dscp_ef"] >= 3, f"the pings' DSCP was not copied to the outer header: {counts}"
    return counts


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_tunnel_ping_tcp_and_wire(variant: Variant, tmp_path: Path) -> None:
    nsutil.need_root()
    pcap = tmp_path / "b-eth0.pcap"
    with _tunnel(variant, tmp_path) as t:
        with _capture(t.pair.b, pcap):
            _ping(t.pair, t.inner_a, t.inner_b)  # (a)
            n, secs = _tcp_transfer(t.pair, t.inner_b)  # (b)
        counts = _check_capture(pcap, variant, min_protected=n)  # (c): at least what the transfer carried
    for d in t.daemons:  # a clean link: nothing refused by the kernel, nothing dropped but the TUN's own IPv6
        log = d.output()  # housekeeping (router solicitations, MLD from fe80::), which no policy covers
        stopped = [line for line in log.splitlines() if "node stopped" in line]
        assert stopped, log
        drops = re.search(r"drops=\{([^}]*)\}", stopped[0])
        assert drops is not None and set(re.findall(r"'(\w+)'", drops.group(1))) <= {"no_policy"}, stopped[0]
        assert re.findall(r"'tx_dropped': (\d+)", stopped[0]) == ["0", "0"], stopped[0]
    print(f"{variant.id}: {n} bytes in {secs:.2f}s ({n * 8 / secs / 1e6:.0f} Mbit/s); wire {counts}")
