"""The ipsecstack benchmark suite: run one scenario, several, or all; table, JSON and plots.

    sudo .venv/bin/python bench/run.py --scenario compare --quick
    sudo .venv/bin/python bench/run.py --scenario tunnel,flood --seconds 10
    sudo .venv/bin/python bench/run.py                          # all scenarios, full durations
    ipsecstack bench --scenario compare --quick                 # the same, from a checkout

Scenarios: micro (protect/unprotect per transform and size, in-process), backend (each packet I/O backend,
manual keys), tunnel (ipsecstack on both ends, IKEv2: TCP 1/4 streams, UDP per size at max rate, ping RTT
idle and under load), flood (unlimited UDP: goodput, peak RSS, CPU per packet), handshake (IKE_SA_INIT +
IKE_AUTH per second with ipsecstack as responder, memory per idle IKE SA) and compare (tunnel + flood over
veth, strongSwan and ipsecstack, handshake with strongSwan and ipsecstack, with ipsecstack's ratios).
Everything but micro needs root (network namespaces). bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.suite.common import Progress, Row, Settings, default_engine, engine_choice  # noqa: E402

SCENARIOS = ("micro", "backend", "tunnel", "flood", "handshake", "compare")
NEEDS_ROOT = {"backend", "tunnel", "flood", "handshake", "compare"}
PATH_NAMES = ("veth", "strongswan", "ipsecstack")
PER_ENGINE = {"backend", "tunnel", "flood", "handshake"}  # run once per engine (micro and compare do it inside)
DEFAULT_RATES = "50k,100k,200k"
MAX_RATE = 10_000_000


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_rate(text: str) -> int:
    """Packets/s from 50k, 1.5m or 20000 (k and m suffixes); ValueError if the text is not one."""
    t = text.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
    number = float(t[:-1] if mult > 1 else t)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(text)
    return round(number * mult)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--scenario", action="append", metavar="LIST",
                    help=f"comma-separated, repeatable: {', '.join(SCENARIOS)} or all (default: all)")  # fmt: skip
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short runs: 2 s iperf3, 4 s flood, 10 pings, 200 handshakes, fewer micro rows",
    )
    ap.add_argument("--seconds", type=float, help="duration of each iperf3 run (default 5, quick 2)")
    ap.add_argument("--flood-seconds", type=float, help="duration of the UDP flood (default 10, quick 4)")
    ap.add_argument("--sizes", help="UDP IP packet sizes, comma-separated (default 64,512,1400)")
    ap.add_argument("--pings", type=int, help="pings per RTT figure (default 20, quick 10)")
    ap.add_argument("--handshakes", type=int,
                    help="IKE SAs the handshake scenario sets up: the rate and memory per SA are taken over them "
                    "(default 1000, quick 200; 10000 for the issue's figure, minutes per responder)")  # fmt: skip
    ap.add_argument("--window", type=int, default=16, help="handshakes in flight at once (default 16)")
    ap.add_argument("--engine", choices=("native", "python", "both"),
                    help="ipsecstack's datapath engine ([agent] datapath): native, python, or both (every "
                    "ipsecstack run once per engine, rows labelled by engine); default: native where the C "
                    f"extension is built, else python (here: {default_engine()})")  # fmt: skip
    ap.add_argument("--rates", default=DEFAULT_RATES,
                    help="tunnel: also UDP at these fixed offered rates, packets/s, comma-separated, k/m suffixes "
                    f"(default {DEFAULT_RATES}; none: no fixed-rate runs)")  # fmt: skip
    ap.add_argument("--rate-sizes", default="64", help="IP packet sizes of the fixed-rate runs (default 64)")
    ap.add_argument("--idle-sas", type=int, default=0,
                    help="handshake: after the rate run, this many more IKE SAs on the same responder, then its "
                    "RSS and kB per SA (test idle-sas; default 0: off)")  # fmt: skip
    ap.add_argument("--encap", action="store_true",
                    help="force ESP-in-UDP between the two ipsecstacks (connection encap = true), as strongSwan's "
                    "kernel-libipsec always does; default: the default outer plane (raw ESP without NAT)")  # fmt: skip
    ap.add_argument("--no-offloads", dest="offloads", action="store_false",
                    help="run the ipsecstack daemons with [agent] offloads = false (no TUN TSO/coalescing, no UDP "
                    "GSO/GRO), to measure what the offloads give; default: on")  # fmt: skip
    ap.add_argument("--paths", help=f"compare only these paths, comma-separated (default {','.join(PATH_NAMES)})")
    ap.add_argument("--micro-packets", type=int, help="packets per micro run (default 20000, quick 3000)")
    ap.add_argument("--json", type=Path, help="output file (default bench/results/suite-<UTC time>.json)")
    ap.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    chosen: list[str] = []
    for item in args.scenario or ["all"]:
        for name in _csv(item):
            if name == "all":
                chosen += SCENARIOS
            elif name in SCENARIOS:
                chosen.append(name)
            else:
                ap.error(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)} or all")
    args.scenarios = list(dict.fromkeys(chosen))
    if not args.scenarios:
        ap.error("no scenario given")
    paths = _csv(args.paths) if args.paths else list(PATH_NAMES)
    bad = [p for p in paths if p not in PATH_NAMES]
    if bad or not paths:
        ap.error(f"unknown path {', '.join(bad) or '(none)'}: choose from {', '.join(PATH_NAMES)}")
    args.path_list = tuple(p for p in PATH_NAMES if p in paths)
    try:
        args.size_list = tuple(int(s) for s in _csv(args.sizes)) if args.sizes else (64, 512, 1400)
    except ValueError:
        ap.error(f"--sizes: give whole numbers, e.g. 64,512,1400 (got {args.sizes!r})")
    if not args.size_list or any(not 64 <= s <= 1400 for s in args.size_list):
        ap.error("--sizes: every size must be 64..1400 bytes (whole IP packets that fit the tunnel)")
    try:
        args.rate_list = () if args.rates.strip().lower() in ("", "none") else tuple(
            dict.fromkeys(parse_rate(r) for r in _csv(args.rates)))  # fmt: skip
    except ValueError:
        ap.error(f"--rates: give packets/s like 50k,100k,200k or none (got {args.rates!r})")
    if any(not 1 <= r <= MAX_RATE for r in args.rate_list):
        ap.error(f"--rates: every rate must be 1..{MAX_RATE:,} packets/s")
    try:
        args.rate_size_list = tuple(int(s) for s in _csv(args.rate_sizes))
    except ValueError:
        ap.error(f"--rate-sizes: give whole numbers, e.g. 64,512 (got {args.rate_sizes!r})")
    if not args.rate_size_list or any(not 64 <= s <= 1400 for s in args.rate_size_list):
        ap.error("--rate-sizes: every size must be 64..1400 bytes")
    if not 0 <= args.idle_sas <= 100_000:
        ap.error("--idle-sas must be 0..100000")
    try:
        args.engine_list = engine_choice(args.engine or default_engine())
    except ValueError as e:
        ap.error(f"--engine: {e}")
    for name in ("seconds", "flood_seconds"):
        v = getattr(args, name)
        if v is not None and not 0.5 <= v <= 600:
            ap.error(f"--{name.replace('_', '-')} must be 0.5..600")
    if args.handshakes is not None and not 1 <= args.handshakes <= 100_000:
        ap.error("--handshakes must be 1..100000")
    if not 1 <= args.window <= 31:
        ap.error("--window must be 1..31 (the responder asks for cookies from 32 half-open SAs)")
    if args.pings is not None and not 1 <= args.pings <= 1000:
        ap.error("--pings must be 1..1000")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick
    return Settings(
        seconds=args.seconds or (2.0 if q else 5.0),
        flood_seconds=args.flood_seconds or (4.0 if q else 10.0),
        sizes=args.size_list,
        pings=args.pings or (10 if q else 20),
        handshakes=args.handshakes or (200 if q else 1000),
        window=args.window,
        engine=args.engine_list[0],
        engines=args.engine_list,
        rates=args.rate_list,
        rate_sizes=args.rate_size_list,
        idle_sas=args.idle_sas,
        encap=args.encap,
        offloads=args.offloads,
        quick=q,
        micro_packets=args.micro_packets or (3000 if q else 20000),
    )


def total_steps(scenarios: list[str], s: Settings, paths: tuple[str, ...]) -> int:
    from bench.suite import backend, compare, flood, handshake, micro, tunnel

    per = {"micro": len(micro.tests(s)), "backend": len(backend.tests(s)), "tunnel": len(tunnel.tests(s)),
           "flood": len(flood.tests(s)), "handshake": len(handshake.tests(s)),
           "compare": compare.steps(s, paths)}  # fmt: skip
    return sum(per[n] * (len(s.engines) if n in PER_ENGINE else 1) for n in scenarios)


def run_scenario(name: str, s: Settings, progress: Progress, paths: tuple[str, ...]) -> list[Row]:
    """One scenario; backend, tunnel, flood and handshake once per engine of ``s.engines``."""
    if name not in PER_ENGINE:
        from bench.suite import compare, micro

        return micro.measure(s, progress) if name == "micro" else compare.measure(s, progress, paths)
    rows: list[Row] = []
    for engine in s.engines:
        one = replace(s, engine=engine)
        try:
            rows += _one_engine(name, one, progress)
        except Exception as e:  # one engine's failure is reported; the other engine still runs
            if len(s.engines) == 1:
                raise
            progress.write(f"bench: scenario {name} on the {engine} engine failed: {type(e).__name__}: {e}")
            rows.append(Row(name, "ipsecstack", engine, "setup", "gbps", None, f"{type(e).__name__}: {e}"[:2000]))
    return rows


def _one_engine(name: str, s: Settings, progress: Progress) -> list[Row]:
    from bench.suite import backend, flood, handshake, tunnel
    from bench.suite.paths import open_path

    if name == "backend":
        return backend.measure(s, progress)
    if name == "handshake":
        return handshake.measure("ipsecstack", s, progress)
    with open_path("ipsecstack", s, tag="bt") as path:
        return (tunnel.measure if name == "tunnel" else flood.measure)(path, s, progress)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    rooted = [n for n in args.scenarios if n in NEEDS_ROOT]
    if rooted and os.geteuid() != 0:
        print(f"bench: {', '.join(rooted)} need root (network namespaces, TUN, raw sockets); run with sudo, "
              "or choose --scenario micro", file=sys.stderr)  # fmt: skip
        return 2
    from bench.suite import compare, goals, report
    from bench.suite.common import machine

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    info = machine()
    print(f"ipsecstack benchmark suite: {', '.join(args.scenarios)} (engine {', '.join(s.engines)}"
          f"{', quick' if s.quick else ''})")  # fmt: skip
    print(f"  {info['cpu']}, {info['usable_cores']} usable cores, kernel {info['kernel']}, Python {info['python']}, "
          f"commit {(info['git_commit'] or '?')[:12]}{' (dirty)' if info['git_dirty'] else ''}, "
          f"load {info['loadavg_at_start'][0]:.2f}")  # fmt: skip
    progress = Progress(total_steps(args.scenarios, s, args.path_list), enabled=not args.no_progress)
    rows: list[Row] = []
    failed: list[str] = []
    try:
        for name in args.scenarios:
            try:
                rows += run_scenario(name, s, progress, args.path_list)
            except Exception as e:  # one scenario's failure is reported; the others still run
                progress.write(f"bench: scenario {name} failed: {type(e).__name__}: {e}")
                failed.append(name)
                rows.append(Row(name, "-", None, "setup", "gbps", None, f"{type(e).__name__}: {e}"[:2000]))
    except KeyboardInterrupt:
        progress.write("bench: interrupted; writing what was measured")
    finally:
        progress.close()
    ratios = {n: compare.ratios([r for r in rows if r.scenario == n]) for n in args.scenarios if n == "compare"}
    goal_results = {n: goals.evaluate(e, s.engines) for n, e in ratios.items()}
    others = [r for r in rows if r.scenario not in ratios]
    if others:
        print("\n" + report.rows_table(others))
    for name, entries in ratios.items():
        print(f"\n{name}: ipsecstack (per engine) against strongSwan (kernel-libipsec) and plain veth, same run")
        print(report.ratio_table(entries))
        errs = [r for r in rows if r.scenario == name and r.error]
        for r in errs:
            print(f"  error: {r.path} {r.engine or '-'} {r.test} {r.metric}: {(r.error or '').splitlines()[0][:200]}")
        print(f"\n{name}: the goals of issue #10")
        print(report.goals_table(goal_results[name]))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.json or REPO / "bench" / "results" / f"suite-{stamp}.json"
    settings = {**vars(s), "sizes": list(s.sizes), "engines": list(s.engines), "rates": list(s.rates),
                "rate_sizes": list(s.rate_sizes), "paths": list(args.path_list)}  # fmt: skip
    doc = report.document(info, settings, args.scenarios, rows, ratios, started, time.monotonic() - t0, goal_results)
    report.write_json(out, doc)
    print(f"\nresults: {out}")
    if not args.no_plots:
        written, why = report.plot(rows, out.with_suffix(""))
        for p in written:
            print(f"plot:    {p}")
        if why:
            print(why)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
