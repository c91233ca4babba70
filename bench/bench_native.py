#!/usr/bin/env python3
"""Per-packet cost of ESP protect/unprotect in the native engine against the Python engine.

For every transform and inner packet size this measures nanoseconds per packet of:

- ``python``: ``ipsecstack.protect`` / ``ipsecstack.unprotect``, one call per packet (the reference);
- ``native[1]``: the native engine called with one packet per batch (the per-call cost shows);
- ``native[64]``: the native engine with batches of 64 packets (what a datapath loop would do).

Tunnel mode, IPv4 inside and outside, ESP (no UDP encapsulation); each unprotect run starts from a
fresh inbound SA so no packet is a replay. Run from the repository root (the extension must be built)::

    PYTHONPATH=. python3 bench/bench_native.py            # full: 20,000 packets, sizes 64/512/1400
    PYTHONPATH=. python3 bench/bench_native.py --quick    # smoke: 2,000 packets, sizes 64 and 1400
    PYTHONPATH=. python3 bench/bench_native.py --only aes128gcm16 --json /tmp/native.json

See bench/README.md for the columns and the figures of a run on the project's machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.bench_xform import GW_A, GW_B, HOST_A, HOST_B, inner_packet, machine_details, time_once
from ipsecstack import SecurityAssociation, native, protect, unprotect
from ipsecstack.crypto.registry import parse_esp_transform

TRANSFORMS = ("aes128gcm16", "aes256gcm16", "chacha20poly1305", "aes128-sha256", "aes256-sha512", "null-sha256")
FULL_N, QUICK_N = 20_000, 2_000
FULL_SIZES, QUICK_SIZES = (64, 512, 1400), (64, 1400)
BATCH = 64
SPI = 0x2002
ENGINES = ("python", "native[1]", f"native[{BATCH}]")


@dataclass
class Row:
    transform: str
    size: int
    op: str
    engine: str
    n: int
    ns_per_pkt: float
    pps: float
    gbps: float
    speedup: float  # python ns / this ns


def make_sa(transform: str, key: bytes, direction: str) -> SecurityAssociation:
    return SecurityAssociation(SPI, "esp", "tunnel", transform, key, direction=direction,  # type: ignore[arg-type]
                               tunnel_src=GW_A, tunnel_dst=GW_B, replay_window=64)  # fmt: skip


def make_engine(transform: str, key: bytes, direction: str) -> Any:
    eng = native.Engine()
    eng.install_sa(make_sa(transform, key, direction))
    return eng


def best(setup: Callable[[], Callable[[], None]], n: int, reps: int) -> float:
    setup()()  # warm-up
    return min(time_once(setup, n) for _ in range(reps))


def python_protect(sa: SecurityAssociation, pkt: bytes, n: int) -> Callable[[], None]:
    def loop() -> None:
        for _ in range(n):
            protect(sa, pkt)

    return loop


def python_unprotect(transform: str, key: bytes, wires: list[bytes]) -> Callable[[], None]:
    sa = make_sa(transform, key, "in")

    def loop() -> None:
        for w in wires:
            unprotect(sa, w)

    return loop


def native_protect(eng: Any, pkt: bytes, n: int, batch: int) -> Callable[[], None]:
    batches = [[pkt] * batch] * (n // batch)

    def loop() -> None:
        for b in batches:
            eng.protect(SPI, b)

    return loop


def native_unprotect(transform: str, key: bytes, wires: list[bytes], batch: int) -> Callable[[], None]:
    eng = make_engine(transform, key, "in")
    batches = [wires[i : i + batch] for i in range(0, len(wires), batch)]

    def loop() -> None:
        for b in batches:
            eng.unprotect(b)

    return loop


def bench(transform: str, size: int, n: int, reps: int) -> list[Row]:
    key = os.urandom(parse_esp_transform(transform).key_len)
    pkt = inner_packet(size, HOST_A, HOST_B)
    n -= n % BATCH
    gen = make_sa(transform, key, "out")
    wires = [protect(gen, pkt) for _ in range(n)]
    check = make_engine(transform, key, "in").unprotect(wires[:BATCH])
    if check != [pkt] * BATCH:
        raise SystemExit(f"{transform} {size}: the native engine did not return the original packets")
    sender = make_engine(transform, key, "out")
    timings = {
        ("protect", "python"): best(lambda: python_protect(make_sa(transform, key, "out"), pkt, n), n, reps),
        ("protect", "native[1]"): best(lambda: native_protect(sender, pkt, n, 1), n, reps),
        ("protect", ENGINES[2]): best(lambda: native_protect(sender, pkt, n, BATCH), n, reps),
        ("unprotect", "python"): best(lambda: python_unprotect(transform, key, wires), n, reps),
        ("unprotect", "native[1]"): best(lambda: native_unprotect(transform, key, wires, 1), n, reps),
        ("unprotect", ENGINES[2]): best(lambda: native_unprotect(transform, key, wires, BATCH), n, reps),
    }
    rows = []
    for (op, engine), ns in timings.items():
        pps = 1e9 / ns
        rows.append(Row(transform, size, op, engine, n, round(ns, 1), round(pps), round(pps * size * 8 / 1e9, 3),
                        round(timings[(op, "python")] / ns, 2)))  # fmt: skip
    return rows


def fmt(r: Row) -> str:
    return (f"{r.transform:<17} {r.size:>5} {r.op:<10} {r.engine:<11} {r.ns_per_pkt:>10,.0f} {r.pps:>11,.0f} "
            f"{r.gbps:>7.2f} {r.speedup:>7.1f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_N} packets, sizes {QUICK_SIZES}")
    p.add_argument("--only", choices=TRANSFORMS, help="one transform")
    p.add_argument("--n", type=int, help=f"packets per repetition (default {FULL_N}, {QUICK_N} with --quick)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, the best is reported (default 3)")
    p.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/native-<time>.json)")
    args = p.parse_args(argv)
    if not native.available:
        print(f"the native engine is not built: {native.why_not}", file=sys.stderr)
        return 2
    from ipsecstack.native import _engine

    n = args.n or (QUICK_N if args.quick else FULL_N)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    machine = {**machine_details(), "engine_openssl": _engine.OPENSSL_VERSION}
    started = dt.datetime.now(dt.UTC)
    print("ipsecstack native engine benchmark (tunnel mode, IPv4, ESP)")
    for k, v in machine.items():
        print(f"  {k:<22} {v}")
    print(f"  {n} packets per repetition, best of {args.reps}; speedup = python ns / engine ns\n")
    print(f"{'transform':<17} {'size':>5} {'op':<10} {'engine':<11} {'ns/packet':>10} {'pps':>11} {'Gbit/s':>7} "
          f"{'speedup':>8}")  # fmt: skip
    rows: list[Row] = []
    t0 = time.perf_counter()
    for transform in [args.only] if args.only else TRANSFORMS:
        for size in sizes:
            for row in bench(transform, size, n, max(1, args.reps)):
                rows.append(row)
                print(fmt(row), flush=True)
    out = args.json or Path(__file__).resolve().parent / "results" / f"native-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "native", "started": started.isoformat(timespec="seconds"),
           "elapsed_s": round(time.perf_counter() - t0, 1), "machine": machine,
           "config": {"n": n, "reps": args.reps, "sizes": list(sizes), "batch": BATCH, "mode": "tunnel"},
           "rows": [asdict(r) for r in rows]}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
