"""The three traffic paths a scenario measures over, each in two fresh network namespaces A and B.

* ``veth``: no IPsec; iperf3 and ping between the veth addresses (the box's own limit).
* ``ipsecstack``: ``ipsecstack run`` in both namespaces with the IKE configuration a user writes (the
  interop tests' shape: no backend keys, so TUN for the tunnel-mode child and the default outer plane),
  IKEv2 PSK, IKE aes128gcm16-prfsha256-x25519, ESP aes128gcm16; A initiates. 10.1.0.1/16 on A's TUN,
  10.2.0.1/16 on B's; traffic goes 10.1.0.1 -> 10.2.0.1.
* ``strongswan``: charon with kernel-libipsec (its userspace ESP, always ESP-in-UDP) in both namespaces
  (tests/interop/strongswan.py, one temp dir and vici socket per instance), the same proposals and
  selectors; 10.x.0.1 sit on a veth pair inside each namespace (kernel-libipsec routes need a local
  address inside local_ts, and this kernel has no dummy module).

``open_path`` yields a ``Path`` once traffic crosses (a ping got through), and tears everything down
afterwards. ``Path.pids`` are the daemons whose CPU and memory the scenarios sample.

Engines: each ipsecstack configuration says ``[agent] datapath = "<settings.engine>"`` (``agent_lines``). Once
the tunnel is up, both daemons are asked over their control socket what they run (``engine_report``:
``status`` and ``list-sas``, the protocol of ``ipsecstack.runtime.control``); ``engine_mismatch`` says why a
row would be mislabelled (another datapath, SAs the native engine left to Python), and ``stamp`` puts the
report in every row's extra and turns a mismatch into the row's error.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from bench.suite.common import ENGINES, REPO, Row, Settings, stop
from ipsecstack.runtime import control
from tests.interop import strongswan as sw
from tests.netns import nsutil

PATHS = ("veth", "strongswan", "ipsecstack")
PSK = "bench-psk-0123456789abcdef0123456789"
IKE = "aes128gcm16-prfsha256-x25519"
ESP = "aes128gcm16"
NET_A, NET_B = "10.1.0.0/16", "10.2.0.0/16"
INNER_A, INNER_B = "10.1.0.1", "10.2.0.1"
# charon at warning level and below only: its per-packet logging must not be what is measured
SWAN_LOG = {"default": 0, "ike": 0, "knl": 0, "net": 0, "cfg": 0, "esp": 0, "lib": 0, "job": 0}

CONFIG = """
[agent]
tun_addrs = ["{tun_addr}"]
log_level = "warning"
control_socket = "{sock}"
{agent_extra}
[connections.bench]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["{ike}"]
local = {{ auth = "psk", id = "{local}" }}
remote = {{ auth = "psk", id = "{remote}" }}
unique = "never"
{conn_extra}
[connections.bench.children.net]
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
esp_proposals = ["{esp}"]
start_action = "{start}"

[secrets.ike.bench]
secret = "{psk}"
"""


def agent_lines(engine: str, offloads: bool = True) -> str:
    """The ``[agent]`` lines that choose the datapath engine (``native`` or ``python``) and, when they are
    off, the offloads (``offloads = false``: no TUN TSO/coalescing, no UDP GSO/GRO)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown datapath engine {engine!r}: one of {', '.join(ENGINES)}")
    return f'datapath = "{engine}"\n' + ("" if offloads else "offloads = false\n")


def engine_report(sock: str, timeout: float = 5.0, children: bool = True) -> dict[str, Any]:
    """What the daemon behind ``sock`` says it runs: ``status`` (``datapath``, ``python_sas``: the SAs the
    native engine refused) and, with ``children``, ``list-sas`` (each child SA's ``engine``). On failure,
    ``{"error": why}``."""
    try:
        st = control.request(sock, "status", timeout=timeout)
        sas: Any = control.request(sock, "list-sas", timeout=timeout) if children else {"ok": True, "result": []}
    except (OSError, ValueError) as e:
        return {"error": f"control socket {sock}: {type(e).__name__}: {e}"}
    if not st.get("ok") or not sas.get("ok"):
        return {"error": f"control socket {sock}: {st.get('error') or sas.get('error')}"}
    res = st["result"]
    engines = [ch.get("engine") for ike in sas["result"] for ch in ike.get("children") or []]
    return {"datapath": res.get("datapath"), "python_sas": res.get("python_sas") or {}, "child_engines": engines,
            "ike_sas": (res.get("ike") or {}).get("sas")}  # fmt: skip


def engine_mismatch(requested: str, seen: dict[str, Any]) -> str | None:
    """Why the figures of a daemon asked for ``requested`` would be mislabelled (None: it runs that engine).

    The daemon's ``datapath`` must be the one asked for, and on the native engine no child SA may have been
    left to the Python transforms (``python_sas``, a child SA whose ``engine`` is python)."""
    if "error" in seen:
        return f"engine not verified: {seen['error']}"
    if seen.get("datapath") != requested:
        return f"asked for datapath {requested!r}, the daemon runs {seen.get('datapath')!r}"
    if requested == "native":
        if seen.get("python_sas"):
            return f"the native engine left SAs to Python: {seen['python_sas']}"
        if any(e != "native" for e in seen.get("child_engines", ())):
            return f"child SAs not on the native engine: {seen['child_engines']}"
    return None


def stamp(rows: list[Row], path: Path) -> list[Row]:
    """Put the engine each daemon of ``path`` reported in every row's extra. A mismatch is the row's error and
    takes its value out of the ratios and goals (it is kept as ``extra.unverified_value``)."""
    if path.kind != "ipsecstack":
        return rows
    for r in rows:
        label(r, path.engine_seen, path.engine_error)
    return rows


def label(r: Row, seen: dict[str, Any], error: str | None) -> Row:
    r.extra["engine_seen"] = seen
    if error:
        r.extra["unverified_value"] = r.value
        r.error = error if r.error is None else f"{error}; {r.error}"
        r.value = None
    return r


def ipsecstack_config(local: str, remote: str, side: str, sock: str, *, engine: str = "python", encap: bool = False,
                      start: str | None = None, offloads: bool = True) -> str:  # fmt: skip
    """The configuration of side "a" (initiator, 10.1/16) or "b" (responder, 10.2/16) at ``local``."""
    a = side == "a"
    return CONFIG.format(
        tun_addr=f"{INNER_A if a else INNER_B}/16", sock=sock, agent_extra=agent_lines(engine, offloads),
        local=local, remote=remote, ike=IKE, esp=ESP,
        conn_extra="encap = true\n" if encap else "", lnet=NET_A if a else NET_B, rnet=NET_B if a else NET_A,
        start=start or ("start" if a else "none"), psk=PSK,
    )  # fmt: skip


class Daemon:
    """``ipsecstack run -c FILE`` in a namespace, output to a log file (no pipe to drain)."""

    def __init__(self, ns: nsutil.Netns, config: FsPath) -> None:
        self.ns = ns
        self.log = config.with_suffix(".log")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as out:
            # ip netns exec execs the interpreter: this PID is the daemon's own
            self.proc = subprocess.Popen(ns.cmd(sys.executable, "-m", "ipsecstack", "run", "-c", str(config)),
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        ns.procs.append(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ipsecstack in {self.ns.name} exited with {self.proc.returncode}:\n"
                               f"{self.output()[-2000:]}")  # fmt: skip

    def stop(self) -> None:
        """SIGTERM (the daemon deletes its SAs and exits), SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        stop(self.ns, self.proc)


@dataclass
class Path:
    kind: str  # one of PATHS
    pair: nsutil.Pair
    src: str  # the address traffic leaves A from
    dst: str  # the address in B it goes to
    engine: str | None  # ipsecstack's datapath engine, None on the other paths
    pids: dict[str, int] = field(default_factory=dict)  # daemon of side "a" and "b"
    tmp: FsPath | None = None
    engine_seen: dict[str, Any] = field(default_factory=dict)  # side -> engine_report of its daemon
    engine_error: str | None = None  # why the rows would be mislabelled (engine_mismatch), None if not


def lan(ns: nsutil.Netns, addr: str) -> None:
    """A stand-in LAN interface holding ``addr`` (a veth pair inside the namespace)."""
    ns.run("ip", "link", "add", "inner0", "type", "veth", "peer", "name", "inner1")
    ns.run("ip", "addr", "add", addr, "dev", "inner0")
    ns.run("ip", "link", "set", "inner1", "up")
    ns.run("ip", "link", "set", "inner0", "up")


def wait_ping(pair: nsutil.Pair, src: str, dst: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pair.a.run("ping", "-c1", "-W1", "-I", src, dst, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no ping {src} -> {dst} within {timeout:.0f}s: {what}")


@contextlib.contextmanager
def open_path(kind: str, settings: Settings, tag: str = "bp") -> Iterator[Path]:
    """Namespaces with ``kind`` set up and carrying traffic; everything removed afterwards."""
    if kind not in PATHS:
        raise ValueError(f"unknown path {kind!r}: one of {', '.join(PATHS)}")
    with nsutil.netns_pair(tag) as pair, tempfile.TemporaryDirectory(prefix="ipsb-") as tmp:
        if kind == "veth":
            yield Path(kind, pair, pair.addr_a, pair.addr_b, None)
        elif kind == "ipsecstack":
            with _ipsecstack(pair, FsPath(tmp), settings) as path:
                yield path
        else:
            with _strongswan(pair) as path:
                yield path


@contextlib.contextmanager
def _ipsecstack(pair: nsutil.Pair, tmp: FsPath, settings: Settings) -> Iterator[Path]:
    daemons: list[Daemon] = []
    try:
        for side, ns in (("b", pair.b), ("a", pair.a)):  # the responder first: A's first IKE_SA_INIT finds it
            cfg = tmp / f"{side}.toml"
            local, remote = (pair.addr_a, pair.addr_b) if side == "a" else (pair.addr_b, pair.addr_a)
            cfg.write_text(ipsecstack_config(local, remote, side, str(tmp / f"{side}.sock"), engine=settings.engine,
                                             encap=settings.encap, offloads=settings.offloads))  # fmt: skip
            daemons.append(Daemon(ns, cfg))
            deadline = time.monotonic() + 20
            while not (tmp / f"{side}.sock").exists() and time.monotonic() < deadline:
                daemons[-1].check_alive()
                time.sleep(0.05)
        try:
            wait_ping(pair, INNER_A, INNER_B, 30, "the ipsecstack tunnel did not come up")
        except RuntimeError as e:
            logs = "\n".join(f"--- {d.ns.name} ---\n{d.output()[-1500:]}" for d in daemons)
            raise RuntimeError(f"{e}\n{logs}") from None
        b, a = daemons
        path = Path("ipsecstack", pair, INNER_A, INNER_B, settings.engine, {"a": a.pid, "b": b.pid}, tmp)
        for side in ("a", "b"):
            path.engine_seen[side] = engine_report(str(tmp / f"{side}.sock"))
            why = engine_mismatch(settings.engine, path.engine_seen[side])
            if why and path.engine_error is None:
                path.engine_error = f"side {side}: {why}"
        yield path
        for d in daemons:
            d.check_alive()  # a daemon that died under load makes the figures meaningless: say so
    finally:
        for d in daemons:
            d.stop()


@contextlib.contextmanager
def _strongswan(pair: nsutil.Pair) -> Iterator[Path]:
    missing = sw.missing_requirements()
    if missing:
        raise RuntimeError("strongSwan is not usable here: " + "; ".join(missing))
    lan(pair.a, f"{INNER_A}/16")
    lan(pair.b, f"{INNER_B}/16")
    common = {"psk": PSK, "ike_proposals": IKE, "esp_proposals": ESP, "conn": "bench", "child": "net",
              "log_levels": SWAN_LOG}  # fmt: skip
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, local_ts=NET_B,
                                              remote_ts=NET_A, **common))  # fmt: skip
        a = stack.enter_context(sw.strongswan(pair.a, local=pair.addr_a, remote=pair.addr_b, local_ts=NET_A,
                                              remote_ts=NET_B, **common))  # fmt: skip
        a.initiate("net")
        b.wait_established(timeout=15)
        wait_ping(pair, INNER_A, INNER_B, 15, "the strongSwan tunnel did not carry a ping")
        assert a.proc is not None and b.proc is not None
        yield Path("strongswan", pair, INNER_A, INNER_B, None, {"a": a.proc.pid, "b": b.proc.pid})
        if not (a.running and b.running):
            raise RuntimeError("charon exited during the measurement:\n" + a.log_tail(20) + b.log_tail(20))
