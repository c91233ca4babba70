"""``backend``: each packet I/O backend's UDP packets/s and TCP throughput (``bench/bench_backends.py``).

Manually keyed SAs (no IKE), so this isolates the backends: ``veth`` (no IPsec), ``tun+raw``, ``tun+udp``,
``nfqueue`` (transport mode) and ``memory`` (two nodes in one process, no kernel). UDP at ``-b 0`` per size
(``udp-<size>``: pps and Gbit/s the receiver got) and one TCP stream (``tcp``: Gbit/s). Every backend but
veth runs on ``settings.engine`` (``[agent] datapath``); the engine each daemon reports (its control socket's
``status``, or the in-process node's datapath for ``memory``) is in each row's ``extra.engine_seen``, and a
mismatch is the row's error.
"""

from __future__ import annotations

from bench import bench_backends as bb
from bench.suite.common import Progress, Row, Settings

BACKENDS = ("veth", "tun+raw", "tun+udp", "nfqueue", "memory")


def tests(settings: Settings) -> list[str]:
    return list(BACKENDS)


def measure(settings: Settings, progress: Progress, scenario: str = "backend") -> list[Row]:
    from bench.suite.paths import engine_mismatch, label

    rows: list[Row] = []
    for backend in BACKENDS:
        progress.start(f"{scenario} {backend} ({settings.engine})")
        engine = None if backend == "veth" else settings.engine
        if backend == "memory":
            got = bb.measure_memory(settings.seconds, settings.sizes, engine)
        else:
            got = bb.measure_kernel(backend, settings.seconds, settings.sizes, engine)
        for r in got:
            mine = []
            if r["pps"] is not None:
                mine.append(Row(scenario, backend, engine, r["test"], "pps", r["pps"], r.get("error")))
            mine.append(Row(scenario, backend, engine, r["test"], "gbps", r["gbps"], r.get("error")))
            if engine is not None:  # both daemons (nodes) must run the engine the row is labelled with
                seen = r.get("engine_seen") or {}
                whys = [f"side {s}: {w}" for s, v in sorted(seen.items()) if (w := engine_mismatch(engine, v))]
                why = "; ".join(whys) or (None if seen else "engine not verified: no status from the daemons")
                mine = [label(x, seen, why) for x in mine]
            rows += mine
        progress.done()
    return rows
