"""``micro``: protect/unprotect per transform and packet size against the bare cipher call, in one process.

Per engine the run measures (``--engine``), best of 3 runs of ``settings.micro_packets`` packets, tunnel
mode, through the real SA code; ``path`` is the operation (``protect``, ``unprotect``, or ``cipher`` for the
bare ``cryptography`` call on the same bytes), ``test`` is ``<transform>/<size>``:

* engine ``python``: ``ipsecstack.protect`` / ``unprotect``, one call per packet
  (``ipsecstack.benchmark.measure``, the quick figure behind ``ipsecstack bench``);
* engine ``native``: the C engine's batch ``Engine.protect`` / ``Engine.unprotect``, ``BATCH`` packets a call
  (what a datapath loop does; ``bench/bench_native.py`` has the per-call matrix). Before timing, a batch the
  native engine unprotects must come back byte for byte.

``extra.overhead_us`` is the time per packet above the bare cipher call. ``bench/bench_xform.py`` is the
full Python matrix with its own report.
"""

from __future__ import annotations

import os
from typing import Any

from bench.suite.common import Progress, Row, Settings
from ipsecstack import benchmark

TRANSFORMS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256")
QUICK_TRANSFORMS = ("aes128gcm16", "chacha20poly1305")
BATCH = 64


def tests(settings: Settings) -> list[str]:
    return [f"{t}/{s}" for t in (QUICK_TRANSFORMS if settings.quick else TRANSFORMS) for s in settings.sizes]


def native_pps(transform: str, size: int, packets: int) -> dict[str, float]:
    """Packets/s of the native engine's batch protect and unprotect (best of 3), checked to round-trip."""
    from bench import bench_native as bn
    from bench.bench_xform import HOST_A, HOST_B, inner_packet
    from ipsecstack import protect
    from ipsecstack.crypto.registry import parse_esp_transform

    key = os.urandom(parse_esp_transform(transform).key_len)
    pkt = inner_packet(size, HOST_A, HOST_B)
    n = max(BATCH, packets - packets % BATCH)
    gen = bn.make_sa(transform, key, "out")
    wires = [protect(gen, pkt) for _ in range(n)]
    if bn.make_engine(transform, key, "in").unprotect(wires[:BATCH]) != [pkt] * BATCH:
        raise RuntimeError(f"{transform}/{size}: the native engine did not return the original packets")
    sender: Any = bn.make_engine(transform, key, "out")
    ns_protect = bn.best(lambda: bn.native_protect(sender, pkt, n, BATCH), n, 3)
    ns_unprotect = bn.best(lambda: bn.native_unprotect(transform, key, wires, BATCH), n, 3)
    return {"protect": 1e9 / ns_protect, "unprotect": 1e9 / ns_unprotect}


def measure(settings: Settings, progress: Progress, scenario: str = "micro") -> list[Row]:
    rows: list[Row] = []

    def add(path: str, engine: str | None, test: str, size: int, pps: float, extra: dict[str, Any]) -> None:
        rows.append(Row(scenario, path, engine, test, "pps", pps, None, extra))
        rows.append(Row(scenario, path, engine, test, "gbps", pps * size * 8 / 1e9))

    for test in tests(settings):
        transform, size_text = test.split("/")
        size = int(size_text)
        progress.start(f"{scenario} {test}")
        res = benchmark.measure(transform, size, settings.micro_packets)  # python rows and the bare cipher
        ceiling = res["ceiling"]
        got: dict[str, dict[str, float]] = {}
        if "python" in settings.engines:
            got["python"] = {op: res[op] for op in ("protect", "unprotect")}
        if "native" in settings.engines:
            got["native"] = native_pps(transform, size, settings.micro_packets)
        for engine, figures in got.items():
            for op, pps in figures.items():
                extra: dict[str, Any] = {"overhead_us": (1 / pps - 1 / ceiling) * 1e6}
                if engine == "native":
                    extra["batch"] = BATCH
                add(op, engine, test, size, pps, extra)
        add("cipher", None, test, size, ceiling, {})
        progress.done()
    return rows
