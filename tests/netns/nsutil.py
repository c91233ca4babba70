"""Network namespaces for tests: created by the test, torn down by the test, processes killed by PID.

Addresses used inside the namespaces are private (172.31.x.y for the "internet" veth link between
the two peers, 10.1/16 and 10.2/16 behind them, fd00::/8 for IPv6); nothing leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_counter = itertools.count()
REPO = Path(__file__).resolve().parents[2]


def need_root() -> None:
    """Skip (with the reason) unless we are root with the tools to build namespaces."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, TUN, NFQUEUE and raw sockets (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 ('ip'); deploy/setup.sh test installs it")


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), check=check, capture_output=True, timeout=timeout, input=input)


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 30, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return run(self.cmd(*args), check=check, timeout=timeout, input=input)

    def sh(self, script: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return run(self.cmd("sh", "-c", script), check=check, timeout=timeout)

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        p = subprocess.Popen(self.cmd(*args), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def ipsecstack(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start the ipsecstack CLI inside the namespace (same interpreter as the tests)."""
        return self.popen(sys.executable, "-m", "ipsecstack", *args, **kw)

    def stop_all(self, timeout: float = 10) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()


@dataclass
class Pair:
    """Two namespaces ``a`` and ``b`` joined by a veth link (``veth_a`` in a, ``veth_b`` in b)."""

    a: Netns
    b: Netns
    addr_a: str
    addr_b: str
    addr6_a: str
    addr6_b: str
    veth_a: str = "eth0"
    veth_b: str = "eth0"


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def netns_pair(tag: str = "t", mtu: int = 1500) -> Iterator[Pair]:
    """Create two namespaces joined by veth with IPv4 and IPv6 addresses; always removed afterwards."""
    need_root()
    n = next(_counter)
    suffix = f"{os.getpid() % 100000}{n}"
    a, b = Netns(f"ips{tag}a{suffix}"), Netns(f"ips{tag}b{suffix}")
    third = 16 + (os.getpid() + n) % 200
    pair = Pair(a, b, f"172.31.{third}.1", f"172.31.{third}.2", f"fd00:31:{third}::1", f"fd00:31:{third}::2")
    created: list[str] = []
    try:
        for ns in (a, b):
            run(["ip", "netns", "add", ns.name])
            created.append(ns.name)
            ns.run("ip", "link", "set", "lo", "up")
        host_veth = f"vx{suffix}"
        run(["ip", "link", "add", host_veth, "type", "veth", "peer", "name", f"vy{suffix}"])
        run(["ip", "link", "set", host_veth, "netns", a.name])
        run(["ip", "link", "set", f"vy{suffix}", "netns", b.name])
        a.run("ip", "link", "set", host_veth, "name", "eth0")
        b.run("ip", "link", "set", f"vy{suffix}", "name", "eth0")
        for ns, v4, v6 in ((a, pair.addr_a, pair.addr6_a), (b, pair.addr_b, pair.addr6_b)):
            ns.run("ip", "link", "set", "eth0", "mtu", str(mtu), "up")
            ns.run("ip", "addr", "add", f"{v4}/24", "dev", "eth0")
            ns.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        yield pair
    finally:
        for ns in (a, b):
            ns.stop_all()
        for name in created:
            run(["ip", "netns", "del", name], check=False)


@dataclass
class Hub:
    """One namespace ``hub`` with a bridge, and ``spokes`` namespaces each joined to that bridge by a veth
    (``eth0`` in the spoke): one IPv4 LAN, the hub at ``addr``, spoke ``i`` at ``spoke_addrs[i]``."""

    hub: Netns
    spokes: list[Netns]
    addr: str
    spoke_addrs: list[str]


@contextlib.contextmanager
def netns_hub(tag: str = "h", spokes: int = 3) -> Iterator[Hub]:
    """Create a hub namespace and ``spokes`` namespaces on one bridged LAN (172.31.x.0/24: hub .1, spokes .2,
    .3, ...), e.g. a gateway and several clients that reach it at the same address; always removed afterwards."""
    need_root()
    n = next(_counter)
    suffix = f"{os.getpid() % 100000}{n}"
    third = 16 + (os.getpid() + n) % 200
    hub = Netns(f"ips{tag}h{suffix}")
    rim = [Netns(f"ips{tag}{i}x{suffix}") for i in range(spokes)]
    net = Hub(hub, rim, f"172.31.{third}.1", [f"172.31.{third}.{i + 2}" for i in range(spokes)])
    created: list[str] = []
    try:
        for ns in (hub, *rim):
            run(["ip", "netns", "add", ns.name])
            created.append(ns.name)
            ns.run("ip", "link", "set", "lo", "up")
        hub.run("ip", "link", "add", "br0", "type", "bridge")
        hub.run("ip", "addr", "add", f"{net.addr}/24", "dev", "br0")
        hub.run("ip", "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(rim, net.spoke_addrs, strict=True)):
            near, far = f"vh{suffix}{i}", f"vs{suffix}{i}"
            run(["ip", "link", "add", near, "type", "veth", "peer", "name", far])
            run(["ip", "link", "set", near, "netns", hub.name])
            run(["ip", "link", "set", far, "netns", ns.name])
            hub.run("ip", "link", "set", near, "master", "br0", "up")
            ns.run("ip", "link", "set", far, "name", "eth0")
            ns.run("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")
        yield net
    finally:
        for ns in (hub, *rim):
            ns.stop_all()
        for name in created:
            run(["ip", "netns", "del", name], check=False)
