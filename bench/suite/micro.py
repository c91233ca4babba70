"""``micro``: protect/unprotect per transform and packet size against the bare cipher call, in one process.

The quick measurement behind ``ipsecstack bench`` (``ipsecstack.benchmark.measure``): best of 3 runs of
``settings.micro_packets`` packets, tunnel mode, through the real SA code; ``path`` is the operation
(``protect``, ``unprotect``, or ``cipher`` for the bare ``cryptography`` call on the same bytes), ``test``
is ``<transform>/<size>``. ``bench/bench_xform.py`` is the full matrix with its own report.
"""

from __future__ import annotations

from bench.suite.common import Progress, Row, Settings
from ipsecstack import benchmark

TRANSFORMS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256")
QUICK_TRANSFORMS = ("aes128gcm16", "chacha20poly1305")


def tests(settings: Settings) -> list[str]:
    return [f"{t}/{s}" for t in (QUICK_TRANSFORMS if settings.quick else TRANSFORMS) for s in settings.sizes]


def measure(settings: Settings, progress: Progress, scenario: str = "micro") -> list[Row]:
    rows: list[Row] = []
    for test in tests(settings):
        transform, size = test.split("/")
        progress.start(f"{scenario} {test}")
        res = benchmark.measure(transform, int(size), settings.micro_packets)
        for op in ("protect", "unprotect", "ceiling"):
            extra = {"overhead_us": (1 / res[op] - 1 / res["ceiling"]) * 1e6} if op != "ceiling" else {}
            engine = settings.engine if op != "ceiling" else None
            rows.append(Row(scenario, "cipher" if op == "ceiling" else op, engine, test, "pps", res[op], None, extra))
            rows.append(Row(scenario, "cipher" if op == "ceiling" else op, engine, test, "gbps",
                            res[op] * int(size) * 8 / 1e9))  # fmt: skip
        progress.done()
    return rows
