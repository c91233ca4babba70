"""What every scenario shares: the result rows, the run settings, the machine, iperf3, ping, /proc sampling.

A result is a flat list of ``Row``s, one figure each: (scenario, path, engine, test, metric) -> value in a
fixed unit (``METRICS``). Flat rows keep the JSON simple and let ``compare`` pivot any figure across paths.

/proc sampling (``ProcWatch``): CPU is utime+stime from ``/proc/<pid>/stat`` (for the whole thread group,
so charon's threads count too), in clock ticks, read at the start and the end of a measurement; memory is
``VmRSS`` sampled every 0.1 s by a thread and ``VmHWM`` (the kernel's own peak) read at the end, both from
``/proc/<pid>/status``. The processes are the daemons of a path (ipsecstack's ``run``, or charon), which
live in network namespaces but in our PID namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.netns import nsutil  # noqa: E402

# The datapath engines an ipsecstack path can run with (``[agent] datapath``, written by paths.agent_lines).
ENGINES = ("native", "python")


def default_engine() -> str:
    """What the daemon itself picks without a ``datapath`` key: native where the C extension is built."""
    from ipsecstack import native

    return "native" if native.available else "python"


def engine_choice(name: str) -> tuple[str, ...]:
    """``--engine`` to the engines a run measures: ``native``, ``python`` or ``both`` (native first).

    Raises ValueError naming the fix when the native engine is asked for and is not built here."""
    wanted = ENGINES if name == "both" else (name,)
    if any(e not in ENGINES for e in wanted):
        raise ValueError(f"unknown engine {name!r}: native, python or both")
    if "native" in wanted:
        from ipsecstack import native

        if not native.available:
            raise ValueError(f"the native engine is not built here ({native.why_not}); use --engine python")
    return wanted


# metric -> (unit, higher is better); the unit is part of the metric's meaning, never converted later
METRICS: dict[str, tuple[str, bool]] = {
    "gbps": ("Gbit/s", True),
    "pps": ("packets/s", True),
    "loss_pct": ("%", False),
    "cpu_us_pkt": ("us/packet", False),
    "rtt_ms": ("ms", False),
    "rss_mb": ("MB", False),
    "hs_per_s": ("handshakes/s", True),
    "cpu_ms_hs": ("ms/handshake", False),
    "kb_per_sa": ("kB/IKE SA", False),
}


@dataclass
class Row:
    scenario: str
    path: str  # veth | ipsecstack | strongswan | memory | tun+raw ...
    engine: str | None  # the ipsecstack datapath engine, None where no ipsecstack datapath runs
    test: str  # tcp-1, udp-64, ping-idle, flood-1400, handshake, aes128gcm16/1400/protect ...
    metric: str  # a key of METRICS
    value: float | None  # None: not measured (the error says why)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return METRICS[self.metric][0]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "unit": self.unit}


@dataclass
class Settings:
    """How long and how much each scenario measures (``run.py`` fills it from the command line)."""

    seconds: float = 5.0  # each iperf3 run
    flood_seconds: float = 10.0  # the unlimited UDP flood
    sizes: tuple[int, ...] = (64, 512, 1400)  # whole IP packets for the UDP runs
    pings: int = 20  # idle RTT: this many pings, 0.1 s apart
    handshakes: int = 1000  # IKE SAs the handshake scenario sets up (rate and memory per SA)
    window: int = 16  # handshakes in flight at once (below the responder's cookie threshold of 32)
    engine: str = "python"  # the engine of the ipsecstack daemons being measured now
    engines: tuple[str, ...] = ("python",)  # every engine the run measures, one pass each (--engine both)
    rates: tuple[int, ...] = ()  # fixed offered UDP rates in packets/s (tunnel: udp-<size>@<rate>)
    rate_sizes: tuple[int, ...] = (64,)  # the IP packet sizes the fixed-rate runs use
    idle_sas: int = 0  # handshake: this many more idle IKE SAs after the rate run, for RSS per SA (0: off)
    encap: bool = False  # force ESP-in-UDP between two ipsecstacks (connection key encap = true)
    offloads: bool = True  # [agent] offloads of the ipsecstack daemons (--no-offloads: false)
    quick: bool = False
    micro_packets: int = 20000


# ------------------------------------------------------------------------------------------ the machine


def _version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None and not os.access(cmd[0], os.X_OK):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def _dist(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What a figure is only valid for: CPU, cores, kernel, Python, library and tool versions, git commit."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    libs = {n: _dist(n) for n in ("ipsecstack", "cryptography", "uvloop", "pyroute2", "NetfilterQueue", "tqdm",
                                  "matplotlib")}  # fmt: skip
    openssl = None
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl.backend import backend

        openssl = backend.openssl_version_text()
    loop = None
    with contextlib.suppress(ImportError):
        from ipsecstack.runtime.loop import loop_name

        loop = loop_name()
    commit = _version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    from tests.interop import strongswan as sw

    charon = sw.find_charon()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "event_loop": loop,
        "openssl": openssl,
        "libraries": libs,
        "iperf3": _version(["iperf3", "--version"]),
        "strongswan": _version([charon, "--version"]) if charon else None,
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "loadavg_at_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads) in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": rest[0] is field 3 (state)
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class ProcWatch:
    """CPU seconds and memory of some processes over a block: ``with ProcWatch({"a": pid}) as w: ...``."""

    INTERVAL = 0.1

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.cpu: dict[str, float] = {}  # CPU seconds used during the block
        self.rss_peak_kb: dict[str, int] = {k: 0 for k in self.pids}  # highest VmRSS sampled
        self.hwm_kb: dict[str, int] = {}  # VmHWM at the end: the peak over the process's life
        self._start: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for k, pid in self.pids.items():
                with contextlib.suppress(OSError, ValueError):
                    self.rss_peak_kb[k] = max(self.rss_peak_kb[k], status_kb(pid, "VmRSS"))
            self._stop.wait(self.INTERVAL)

    def __enter__(self) -> ProcWatch:
        self._start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for k, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError):
                self.cpu[k] = cpu_seconds(pid) - self._start[k]
                self.hwm_kb[k] = status_kb(pid, "VmHWM")
                self.rss_peak_kb[k] = max(self.rss_peak_kb[k], status_kb(pid, "VmRSS"))

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


# ------------------------------------------------------------------------------------------ iperf3, ping


def start_iperf_server(ns: nsutil.Netns, addr: str) -> subprocess.Popen[bytes]:
    """``iperf3 -s -1`` bound to ``addr`` in ``ns``, ready to accept (bounded wait)."""
    server = subprocess.Popen(ns.cmd("iperf3", "-s", "-1", "-B", addr), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)  # fmt: skip
    ns.procs.append(server)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if ns.run("ss", "-Htln", f"src {addr}:5201", check=False).stdout.strip():
            break
        time.sleep(0.05)
    return server


def stop(ns: nsutil.Netns, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)
    with contextlib.suppress(ValueError):
        ns.procs.remove(proc)


def iperf(pair: nsutil.Pair, src: str, dst: str, args: list[str], seconds: float) -> dict[str, Any]:
    """One iperf3 run from ``src`` in A to a fresh server at ``dst`` in B; its JSON, or {"error": why}."""
    server = start_iperf_server(pair.b, dst)
    try:
        cmd = ["iperf3", "-c", dst, "-B", src, "-t", str(seconds), "-J", "--connect-timeout", "5000", *args]
        try:
            out = pair.a.run(*cmd, check=False, timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            # a flood can starve iperf3's own control connection, which crosses the same tunnel
            return {"error": f"iperf3 did not finish within {seconds + 20:.0f}s"}
        try:
            res: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            return {"error": (out.stderr.decode(errors="replace") or "no output from iperf3")[-300:]}
        if "error" in res:
            return {"error": str(res["error"])}
        return res
    finally:
        stop(pair.b, server)


def udp_result(res: dict[str, Any], seconds: float) -> tuple[int, int, float]:
    """(packets delivered, packets sent, seconds) of an iperf3 UDP run, from the receiver's count."""
    end = res.get("end", {})
    summ = end.get("sum", {})
    sent = int(end.get("sum_sent", {}).get("packets", 0) or summ.get("packets", 0))
    lost = int(summ.get("lost_packets", 0))
    total = int(summ.get("packets", 0))
    secs = float(summ.get("seconds") or seconds)
    return max(0, total - lost), max(sent, total), secs


PING_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
LOSS_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping(ns: nsutil.Netns, src: str, dst: str, count: int, interval: float = 0.1) -> dict[str, Any]:
    """``ping -c count`` from ``src``: min/avg/max/mdev in ms and the loss, or {"error": why}."""
    r = ns.run("ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", "-I", src, dst, check=False,
               timeout=count * interval + 30)  # fmt: skip
    return parse_ping(r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def parse_ping(text: str, stderr: str = "") -> dict[str, Any]:
    """iputils ping's summary: min/avg/max/mdev in ms, packets sent and received; or {"error": why}."""
    m, n = PING_RE.search(text), LOSS_RE.search(text)
    if n is None:
        return {"error": (text + stderr).strip()[-300:] or "no ping output"}
    sent, got = int(n.group(1)), int(n.group(2))
    if m is None:  # every ping lost: no rtt line
        return {"error": f"{got} of {sent} pings answered", "sent": sent, "received": got}
    mn, avg, mx, mdev = (float(g) for g in m.groups())
    return {"min": mn, "avg": avg, "max": mx, "mdev": mdev, "sent": sent, "received": got}


@contextlib.contextmanager
def background(fn: Any, *args: Any) -> Iterator[dict[str, Any]]:
    """Run ``fn(*args)`` in a thread for the block; its return value lands in the yielded dict's "result"."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except Exception as e:  # reported as the row's error, never lost
            box["result"] = {"error": f"{type(e).__name__}: {e}"}

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield box
    finally:
        t.join(timeout=120)


class Progress:
    """A progress bar over the run's steps (tqdm when installed, else one line per step on stderr)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.count, self.enabled = total, 0, enabled
        self._bar: Any = None
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")  # fmt: skip

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(label[:48])
        elif self.enabled:
            print(f"[{self.count + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
