"""``handshake``: IKE_SA_INIT + IKE_AUTH per second with a real daemon as responder, and memory per idle SA.

Namespace B runs the responder: ``ipsecstack run`` (side "b" of ``paths.CONFIG``: PSK, IKE
aes128gcm16-prfsha256-x25519, one tunnel-mode child, ``unique = never`` so every IKE SA of the one peer
identity stays) or, for ``compare``, charon with kernel-libipsec and the same settings. Namespace A runs
``hsload`` (ipsecstack's sans-IO ``IkeManager`` over UDP): first 20 handshakes to warm up (imports, caches,
the first child SA's policies), then ``settings.handshakes`` more, ``settings.window`` in flight at once.

Figures (test ``handshake``), all of the responder's real process:

* ``hs_per_s``: established IKE SAs (each with its child SA) / seconds from the first IKE_SA_INIT to the
  last IKE_AUTH response. ``extra.responder_cpu_util`` is the responder's CPU seconds / wall seconds: near
  1.0 the responder was the limit, well below it the initiator (the same Python IKE code) was.
* ``cpu_ms_hs``: the responder's utime+stime over the run / handshakes.
* ``kb_per_sa``: (VmRSS after the run - VmRSS after the warm-up) / handshakes, in kB: what one more idle
  IKE SA with its child SA costs the daemon. Measured on the real daemon (not in-process); the allocator
  keeps freed memory, so this is an upper bound, and at small counts a coarse one.

With ``settings.idle_sas`` = N (``--idle-sas N``), N more handshakes follow the rate run on the same
responder (test ``idle-sas``): ``rss_mb`` is the responder's VmRSS holding them all (``extra.sas``: warm-up
+ rate run + N), ``kb_per_sa`` is (VmRSS after - VmRSS before those N) / N. On ipsecstack the control
socket's count of IKE SAs must reach ``extra.sas`` (an SA the responder dropped is not idle memory).

On ipsecstack the engine is checked after the warm-up (``status``: ``datapath``, ``python_sas``) and recorded in
every row's ``extra.engine_seen``; a daemon that runs another engine than the one asked for makes every row an
error (``paths.engine_mismatch``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path as FsPath

from bench.suite.common import REPO, Progress, Row, Settings, cpu_seconds, status_kb
from bench.suite.paths import (
    ESP,
    IKE,
    NET_A,
    NET_B,
    PSK,
    SWAN_LOG,
    Daemon,
    engine_mismatch,
    engine_report,
    ipsecstack_config,
    label,
    lan,
)
from tests.interop import strongswan as sw
from tests.netns import nsutil

WARMUP = 20
RESPONDERS = ("ipsecstack", "strongswan")


def tests(settings: Settings) -> list[str]:
    return ["handshake", *(["idle-sas"] if settings.idle_sas else [])]


def _load(pair: nsutil.Pair, count: int, window: int, timeout: float) -> dict[str, object]:
    cmd = pair.a.cmd(sys.executable, "-m", "bench.suite.hsload", "--local", pair.addr_a, "--remote", pair.addr_b,
                     "--count", str(count), "--window", str(window), "--timeout", str(timeout))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=env, cwd=REPO)
    try:
        res: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"hsload exited {r.returncode}: {r.stderr.strip()[-500:]}"}
    return res


def measure(kind: str, settings: Settings, progress: Progress, scenario: str = "handshake") -> list[Row]:
    if kind not in RESPONDERS:
        raise ValueError(f"unknown responder {kind!r}: one of {', '.join(RESPONDERS)}")
    engine = settings.engine if kind == "ipsecstack" else None
    progress.start(f"{scenario} {kind} responder x{settings.handshakes}")
    with nsutil.netns_pair("bh") as pair, tempfile.TemporaryDirectory(prefix="ipsh-") as tmp:
        if kind == "ipsecstack":
            cfg = FsPath(tmp) / "b.toml"
            sock = FsPath(tmp) / "b.sock"
            cfg.write_text(ipsecstack_config(pair.addr_b, pair.addr_a, "b", str(sock), engine=settings.engine))
            daemon = Daemon(pair.b, cfg)
            try:
                deadline = time.monotonic() + 20
                while not sock.exists() and time.monotonic() < deadline:
                    daemon.check_alive()
                    time.sleep(0.05)
                rows = _run(pair, daemon.pid, kind, engine, settings, scenario, str(sock))
                daemon.check_alive()
            finally:
                daemon.stop()
        else:
            missing = sw.missing_requirements()
            if missing:
                raise RuntimeError("strongSwan is not usable here: " + "; ".join(missing))
            lan(pair.b, "10.2.0.1/16")
            # charon refuses more than 5 half-open SAs per peer address by default (block_threshold)
            limits = f"block_threshold = {settings.window * 4}\ncookie_threshold = {settings.window * 4}\n"
            with sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, local_ts=NET_B, remote_ts=NET_A,
                               psk=PSK, ike_proposals=IKE, esp_proposals=ESP, conn="bench", child="net",
                               log_levels=SWAN_LOG, conn_extra={"unique": "never"},
                               extra_charon=limits) as swan:  # fmt: skip
                assert swan.proc is not None
                rows = _run(pair, swan.proc.pid, kind, engine, settings, scenario)
    progress.done(len(tests(settings)))
    return rows


def _run(pair: nsutil.Pair, pid: int, kind: str, engine: str | None, settings: Settings, scenario: str,
         sock: str | None = None) -> list[Row]:  # fmt: skip
    def rows_error(why: str) -> list[Row]:
        return [Row(scenario, kind, engine, "handshake", m, None, why) for m in ("hs_per_s", "cpu_ms_hs", "kb_per_sa")]

    warm = _load(pair, WARMUP, min(settings.window, WARMUP), 60)
    if "error" in warm or warm.get("established") != WARMUP:
        return rows_error(f"warm-up failed: {warm}")
    seen: dict[str, object] = {}
    mismatch = None
    if sock is not None and engine is not None:  # the responder's engine, with the warm-up's child SAs
        seen = engine_report(sock)
        mismatch = engine_mismatch(engine, seen)
    time.sleep(0.5)
    rss0, cpu0 = status_kb(pid, "VmRSS"), cpu_seconds(pid)
    t0 = time.monotonic()
    res = _load(pair, settings.handshakes, settings.window, max(60.0, settings.handshakes * 0.2))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    time.sleep(1.0)  # let the responder finish what the last responses left (child SA installation, logs)
    rss1 = status_kb(pid, "VmRSS")
    n = res.get("established")
    if "error" in res or not isinstance(n, int) or not n:
        return rows_error(f"handshakes failed: {res}")
    seconds, init_cpu = res.get("seconds"), res.get("cpu_s")
    assert isinstance(seconds, float)
    err = f"only {n} of {settings.handshakes} established: {res}" if n != settings.handshakes else None
    extra = {"established": n, "failed": res.get("failed"), "seconds": seconds,
             "responder_cpu_util": cpu / seconds if seconds else None, "window": settings.window,
             "initiator_cpu_util": init_cpu / seconds if isinstance(init_cpu, float) and seconds else None,
             "wall_s": wall}  # fmt: skip
    rows = [
        Row(scenario, kind, engine, "handshake", "hs_per_s", n / seconds if seconds else None, err, extra),
        Row(scenario, kind, engine, "handshake", "cpu_ms_hs", cpu / n * 1e3, err, {"cpu_s": cpu}),
        Row(scenario, kind, engine, "handshake", "kb_per_sa", (rss1 - rss0) / n, err,
            {"vmrss_before_kb": rss0, "vmrss_after_kb": rss1, "sas": n + WARMUP}),
    ]  # fmt: skip
    if settings.idle_sas:
        rows += _idle(pair, pid, kind, engine, settings, scenario, sock, held=n + WARMUP, rss_before=rss1)
    if engine is not None:
        for r in rows:
            label(r, seen, mismatch)
    return rows


def _idle(pair: nsutil.Pair, pid: int, kind: str, engine: str | None, settings: Settings, scenario: str,
          sock: str | None, held: int, rss_before: int) -> list[Row]:  # fmt: skip
    """``settings.idle_sas`` more IKE SAs on a responder already holding ``held``: its RSS and kB per SA."""
    want = settings.idle_sas
    res = _load(pair, want, settings.window, max(60.0, want * 0.2))
    time.sleep(1.0)
    rss = status_kb(pid, "VmRSS")
    n = res.get("established")
    if "error" in res or not isinstance(n, int) or not n:
        why = f"idle SAs failed: {res}"
        return [Row(scenario, kind, engine, "idle-sas", m, None, why) for m in ("rss_mb", "kb_per_sa")]
    total = held + n
    err = f"only {n} of {want} established: {res}" if n != want else None
    extra: dict[str, object] = {"sas": total, "added": n, "vmrss_before_kb": rss_before, "vmrss_after_kb": rss}
    if sock is not None:  # the daemon's own count: every SA set up is still held
        count = engine_report(sock, children=False).get("ike_sas")
        extra["daemon_ike_sas"] = count
        if count != total and err is None:
            err = f"the responder holds {count} IKE SAs, {total} were set up"
    return [
        Row(scenario, kind, engine, "idle-sas", "rss_mb", rss / 1024, err, dict(extra)),
        Row(scenario, kind, engine, "idle-sas", "kb_per_sa", (rss - rss_before) / n, err, dict(extra)),
    ]
