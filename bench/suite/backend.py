"""``backend``: each packet I/O backend's UDP packets/s and TCP throughput (``bench/bench_backends.py``).

Manually keyed SAs (no IKE), so this isolates the backends: ``veth`` (no IPsec), ``tun+raw``, ``tun+udp``,
``nfqueue`` (transport mode) and ``memory`` (two nodes in one process, no kernel). UDP at ``-b 0`` per size
(``udp-<size>``: pps and Gbit/s the receiver got) and one TCP stream (``tcp``: Gbit/s).
"""

from __future__ import annotations

from bench import bench_backends as bb
from bench.suite.common import Progress, Row, Settings

BACKENDS = ("veth", "tun+raw", "tun+udp", "nfqueue", "memory")


def tests(settings: Settings) -> list[str]:
    return list(BACKENDS)


def measure(settings: Settings, progress: Progress, scenario: str = "backend") -> list[Row]:
    rows: list[Row] = []
    for backend in BACKENDS:
        progress.start(f"{scenario} {backend}")
        if backend == "memory":
            got = bb.measure_memory(settings.seconds, settings.sizes)
        else:
            got = bb.measure_kernel(backend, settings.seconds, settings.sizes)
        engine = None if backend == "veth" else settings.engine
        for r in got:
            if r["pps"] is not None:
                rows.append(Row(scenario, backend, engine, r["test"], "pps", r["pps"], r.get("error")))
            rows.append(Row(scenario, backend, engine, r["test"], "gbps", r["gbps"], r.get("error")))
        progress.done()
    return rows
