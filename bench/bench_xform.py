#!/usr/bin/env python3
"""Per-packet cost of ESP/AH protect and unprotect, against the bare ``cryptography`` call ("ceiling").

For every transform, packet size and direction this measures packets/s of ``ipsecstack.protect`` /
``ipsecstack.unprotect`` and, on a buffer of the same size, the cipher call alone: AESGCM or
ChaCha20Poly1305 ``encrypt``/``decrypt``; for CBC + HMAC a persistent AES-CBC encryptor/decryptor
``update`` plus the HMAC; for ENCR_NULL and AH the HMAC alone. The difference per packet is what the
datapath adds (header building, padding, sequence numbers, replay window, copies), and the project
aims to keep it under 2 us. The batch ``Datapath.outbound``/``inbound`` path (what the runtime calls)
is measured for aes128gcm16 at 1400 bytes.

Run from the repository root::

    PYTHONPATH=. python3 bench/bench_xform.py            # full run (~2 minutes on 2 cores)
    PYTHONPATH=. python3 bench/bench_xform.py --quick    # smoke run
    PYTHONPATH=. python3 bench/bench_xform.py --only aes256-sha256

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hmac
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

import ipsecstack
from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template, protect, unprotect
from ipsecstack.crypto.registry import AhSuite, EspSuite, parse_ah_transform, parse_esp_transform
from ipsecstack.wire import ip

GOAL_US = 2.0
FULL_N = 20_000
QUICK_N = 2_000
FULL_SIZES = (64, 512, 1400)
QUICK_SIZES = (64, 1400)
BATCH = 64
ESP_TRANSFORMS = (
    "aes128gcm16",
    "aes256gcm16",
    "chacha20poly1305",
    "aes128-sha256",
    "aes256-sha256",
    "aes256-sha384",
    "aes256-sha512",
    "null-sha256",
)
GW_A, GW_B = "192.0.2.1", "192.0.2.2"
HOST_A, HOST_B = "10.1.0.10", "10.2.0.20"
SPI = 0x1001

Timed = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a transform in a mode, measured at every packet size."""

    label: str  # transform column: ESP keyword, or "ah-<integ>" for AH
    protocol: str  # "esp" | "ah"
    transform: str
    mode: str  # "tunnel" | "transport"
    udp: bool = False

    @property
    def mode_label(self) -> str:
        return self.mode + ("+udp" if self.udp else "")


@dataclass
class Row:
    transform: str
    mode: str
    size: int
    op: str
    n: int
    ns_per_pkt: float
    pps: float
    gbps: float
    ceiling_call: str
    ceiling_ns_per_pkt: float
    ceiling_pps: float
    ratio: float
    overhead_us: float
    meets_goal: bool


def all_cases() -> list[Case]:
    cases = [Case(t, "esp", t, "tunnel") for t in ESP_TRANSFORMS]
    cases.append(Case("ah-sha256", "ah", "sha256", "tunnel"))
    cases.append(Case("aes128gcm16", "esp", "aes128gcm16", "transport"))
    cases.append(Case("aes128gcm16", "esp", "aes128gcm16", "tunnel", udp=True))
    return cases


# --- timing ----------------------------------------------------------------------------------------


def time_once(setup: Callable[[], Timed], n: int) -> float:
    """Nanoseconds per item of one run of ``setup()()`` over ``n`` items; ``setup`` itself is not timed.

    The garbage collector is off while the loop runs (as in ``timeit``).
    """
    loop = setup()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        loop()
        elapsed = time.perf_counter_ns() - t0
    finally:
        gc.enable()
    return elapsed / n


def best_pair(
    setup: Callable[[], Timed], warmup: Callable[[], Timed], ceil_setup: Callable[[], Timed], n: int, reps: int
) -> tuple[float, float]:
    """Best (lowest) ns per packet of the datapath loop and of the ceiling loop over ``reps`` repetitions.

    ``setup`` runs untimed before every repetition and returns the loop to time (so unprotect can start
    each repetition from a fresh receiver SA). The two loops alternate, so a clock-speed change or a
    noisy neighbour on the machine hits both rather than skewing their difference.
    """
    warmup()()
    ceil_setup()()
    best = ceil_best = float("inf")
    for _ in range(reps):
        best = min(best, time_once(setup, n))
        ceil_best = min(ceil_best, time_once(ceil_setup, n))
    return best, ceil_best


def repeat_call(fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> Timed:
    def loop() -> None:
        for _ in range(n):
            fn(*args)

    return loop


def each_packet(fn: Callable[[Any, bytes], Any], sa: Any, packets: list[bytes]) -> Timed:
    def loop() -> None:
        for p in packets:
            fn(sa, p)

    return loop


# --- packets and SAs -------------------------------------------------------------------------------


def _addr(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def inner_packet(size: int, src: str, dst: str, ident: int = 1) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes with a random payload."""
    assert size >= 28
    udp = (40000).to_bytes(2, "big") + (5001).to_bytes(2, "big") + (size - 20).to_bytes(2, "big") + b"\x00\x00"
    return ip.build_ipv4(0, size, ident, True, 64, ip.PROTO_UDP, _addr(src), _addr(dst)) + udp + os.urandom(size - 28)


def suite_of(case: Case) -> EspSuite | AhSuite:
    return parse_esp_transform(case.transform) if case.protocol == "esp" else parse_ah_transform(case.transform)


def make_sa(case: Case, key: bytes, direction: str) -> SecurityAssociation:
    tunnel = case.mode == "tunnel"
    return SecurityAssociation(
        SPI,
        case.protocol,  # type: ignore[arg-type]
        case.mode,  # type: ignore[arg-type]
        case.transform,
        key,
        direction=direction,  # type: ignore[arg-type]
        tunnel_src=GW_A if tunnel else None,
        tunnel_dst=GW_B if tunnel else None,
        udp_encap=(4500, 4500) if case.udp else None,
        replay_window=64,
    )


def packet_for(case: Case, size: int) -> bytes:
    if case.mode == "tunnel":
        return inner_packet(size, HOST_A, HOST_B)
    return inner_packet(size, GW_A, GW_B)


# --- ceilings --------------------------------------------------------------------------------------


def esp_plaintext_len(case: Case, suite: EspSuite, size: int) -> int:
    """Bytes ESP hands to the cipher: payload (whole inner packet in tunnel mode) + padding + 2."""
    payload = size if case.mode == "tunnel" else size - 20
    block = max(4, suite.encr.block)
    return payload + (-(payload + 2)) % block + 2


def ceiling(case: Case, size: int, op: str, key: bytes, n: int) -> tuple[str, Callable[[], Timed]]:
    """Description and setup of the bare cryptography work for one packet of ``size`` bytes."""
    suite = suite_of(case)
    if isinstance(suite, AhSuite):
        # AH ICV: outer IPv4 header + AH header (12 + ICV field) + inner packet.
        mac = hmac.new(key, digestmod=suite.integ.hash_name)
        data = bytes(20 + 12 + suite.integ.icv_len + size)
        return f"hmac-{suite.integ.hash_name}({len(data)}B)", lambda: repeat_call(_hmac_once, (mac, data), n)
    encr, integ = suite.encr, suite.integ
    plen = esp_plaintext_len(case, suite, size)
    ek = key[: encr.key_len]
    if encr.kind in ("gcm", "chacha"):
        aead: AESGCM | ChaCha20Poly1305 = AESGCM(ek) if encr.kind == "gcm" else ChaCha20Poly1305(ek)
        name = "AESGCM" if encr.kind == "gcm" else "ChaCha20Poly1305"
        nonce, aad, buf = os.urandom(12), bytes(8), os.urandom(plen)
        if op == "protect":
            return f"{name}.encrypt({plen}B)", lambda: repeat_call(aead.encrypt, (nonce, buf, aad), n)
        ct = aead.encrypt(nonce, buf, aad)
        return f"{name}.decrypt({plen}B)", lambda: repeat_call(aead.decrypt, (nonce, ct, aad), n)
    assert integ is not None
    mac = hmac.new(key[encr.key_len :], digestmod=integ.hash_name)
    if encr.kind == "null":
        data = bytes(8 + plen)  # ESP header + payload, no IV
        return f"hmac-{integ.hash_name}({len(data)}B)", lambda: repeat_call(_hmac_once, (mac, data), n)
    # CBC: the cipher processes the plaintext; the ICV covers header + IV + ciphertext.
    cipher = Cipher(algorithms.AES(ek), modes.CBC(bytes(16)))
    buf = os.urandom(plen)
    data = bytes(8 + 16 + plen)
    label = f"AES-CBC({plen}B)+hmac-{integ.hash_name}({len(data)}B)"
    stream = cipher.encryptor() if op == "protect" else cipher.decryptor()
    return label, lambda: repeat_call(_cbc_hmac_once, (stream.update, buf, mac, data), n)


def _hmac_once(mac: hmac.HMAC, data: bytes) -> bytes:
    h = mac.copy()
    h.update(data)
    return h.digest()


def _cbc_hmac_once(update: Callable[[bytes], bytes], buf: bytes, mac: hmac.HMAC, data: bytes) -> bytes:
    update(buf)
    h = mac.copy()
    h.update(data)
    return h.digest()


# --- measurements ----------------------------------------------------------------------------------


def make_row(case_label: str, mode: str, size: int, op: str, n: int, ns: float, ceil_name: str, ceil_ns: float) -> Row:
    pps = 1e9 / ns
    ceil_pps = 1e9 / ceil_ns
    overhead = (ns - ceil_ns) / 1000
    return Row(
        transform=case_label,
        mode=mode,
        size=size,
        op=op,
        n=n,
        ns_per_pkt=round(ns, 1),
        pps=round(pps),
        gbps=round(pps * size * 8 / 1e9, 4),
        ceiling_call=ceil_name,
        ceiling_ns_per_pkt=round(ceil_ns, 1),
        ceiling_pps=round(ceil_pps),
        ratio=round(pps / ceil_pps, 4),
        overhead_us=round(overhead, 3),
        meets_goal=overhead < GOAL_US,
    )


def bench_case(case: Case, size: int, n: int, reps: int) -> list[Row]:
    key = os.urandom(suite_of(case).key_len)
    pkt = packet_for(case, size)
    warm = max(200, n // 20)
    rows = []

    # protect: one sender SA, the sequence number just keeps counting.
    sender = make_sa(case, key, "out")
    name, ceil_setup = ceiling(case, size, "protect", key, n)
    ns, ceil_ns = best_pair(
        lambda: repeat_call(protect, (sender, pkt), n),
        lambda: repeat_call(protect, (sender, pkt), warm),
        ceil_setup,
        n,
        reps,
    )
    rows.append(make_row(case.label, case.mode_label, size, "protect", n, ns, name, ceil_ns))

    # unprotect: n packets with fresh sequence numbers, replayed into a new receiver SA each repetition.
    gen = make_sa(case, key, "out")
    wires = [protect(gen, pkt) for _ in range(n)]
    check = make_sa(case, key, "in")
    if unprotect(check, wires[0]) != pkt:
        raise SystemExit(f"{case.label} {case.mode_label} {size}: unprotect did not return the original packet")
    name, ceil_setup = ceiling(case, size, "unprotect", key, n)
    ns, ceil_ns = best_pair(
        lambda: each_packet(unprotect, make_sa(case, key, "in"), wires),
        lambda: each_packet(unprotect, make_sa(case, key, "in"), wires[:warm]),
        ceil_setup,
        n,
        reps,
    )
    rows.append(make_row(case.label, case.mode_label, size, "unprotect", n, ns, name, ceil_ns))
    return rows


def _gateway(key: bytes, outbound: bool) -> tuple[Datapath, SecurityAssociation]:
    case = Case("aes128gcm16", "esp", "aes128gcm16", "tunnel")
    sa = make_sa(case, key, "out" if outbound else "in")
    sel = Selector(f"{HOST_A}/16", f"{HOST_B}/16")
    if outbound:
        pol = Policy(sel, Action.PROTECT, "out", Template("esp", "tunnel", spi=SPI, tunnel_dst=GW_B))
    else:
        pol = Policy(sel, Action.PROTECT, "in", Template("esp", "tunnel", spi=SPI))
    dp = Datapath()
    dp.spd.add(pol)
    dp.install(sa, 0.0)
    return dp, sa


def bench_datapath(size: int, n: int, reps: int) -> list[Row]:
    """Datapath.outbound / inbound in batches of BATCH packets (aes128gcm16, tunnel, IPv4)."""
    case = Case("aes128gcm16", "esp", "aes128gcm16", "tunnel")
    key = os.urandom(suite_of(case).key_len)
    nb = max(1, n // BATCH)
    total = nb * BATCH
    batch = [inner_packet(size, HOST_A, HOST_B, ident=i) for i in range(BATCH)]
    rows = []

    out_dp, _ = _gateway(key, True)
    res = out_dp.outbound(batch, 0.0)
    if res.dropped or len(res.to_network) != BATCH:
        raise SystemExit(f"Datapath.outbound dropped packets: {res.dropped[:1]}")

    def out_loop(count: int) -> Timed:
        def loop() -> None:
            for _ in range(count):
                out_dp.outbound(batch, 0.0)

        return loop

    name, ceil_setup = ceiling(case, size, "protect", key, total)
    ns, ceil_ns = best_pair(lambda: out_loop(nb), lambda: out_loop(max(4, nb // 20)), ceil_setup, total, reps)
    rows.append(make_row(case.label, case.mode, size, f"outbound[{BATCH}]", total, ns, name, ceil_ns))

    gen_dp, _ = _gateway(key, True)
    wire_batches = [gen_dp.outbound(batch, 0.0).to_network for _ in range(nb)]
    check_dp, _ = _gateway(key, False)
    res = check_dp.inbound(wire_batches[0], 0.0)
    if res.dropped or res.to_inner != batch:
        raise SystemExit(f"Datapath.inbound did not deliver the batch intact: {res.dropped[:1]}")

    def in_loop(batches: list[list[bytes]]) -> Timed:
        dp, _ = _gateway(key, False)

        def loop() -> None:
            for b in batches:
                dp.inbound(b, 0.0)

        return loop

    name, ceil_setup = ceiling(case, size, "unprotect", key, total)
    warm_batches = wire_batches[: max(4, nb // 20)]
    ns, ceil_ns = best_pair(lambda: in_loop(wire_batches), lambda: in_loop(warm_batches), ceil_setup, total, reps)
    rows.append(make_row(case.label, case.mode, size, f"inbound[{BATCH}]", total, ns, name, ceil_ns))
    return rows


# --- machine details and output --------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_details() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cpu_model": cpu_model(),
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "ipsecstack": ipsecstack.__version__,
    }


COLUMNS = (
    ("transform", 17),
    ("mode", 13),
    ("size", 5),
    ("op", 13),
    ("pps", 9),
    ("Gbit/s", 7),
    ("ceiling pps", 11),
    ("ratio", 6),
    ("overhead us", 11),
    ("meets <2us", 10),
)


def format_row(r: Row) -> str:
    cells = (
        r.transform,
        r.mode,
        str(r.size),
        r.op,
        f"{r.pps:,.0f}",
        f"{r.gbps:.3f}",
        f"{r.ceiling_pps:,.0f}",
        f"{r.ratio:.2f}",
        f"{r.overhead_us:.2f}",
        "yes" if r.meets_goal else "NO",
    )
    return "  ".join(
        c.ljust(w) if i < 4 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


def header() -> str:
    cols = "  ".join(name.ljust(w) if i < 4 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS))
    return cols + "\n" + "-" * len(cols)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    known = sorted({c.label for c in all_cases()} | {"sha256"})
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run: N={QUICK_N}, sizes {QUICK_SIZES}")
    p.add_argument("--json", metavar="PATH", type=Path, help="where to write the JSON (default bench/results/...)")
    p.add_argument("--only", metavar="TRANSFORM", choices=known, help="one transform: " + ", ".join(known))
    p.add_argument("--n", type=int, help="packets per repetition (default 20000, 2000 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the best is reported (default 3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.n or (QUICK_N if args.quick else FULL_N)
    reps = max(1, args.reps)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    only = "ah-sha256" if args.only == "sha256" else args.only
    cases = [c for c in all_cases() if only is None or c.label == only]

    machine = machine_details()
    started = dt.datetime.now(dt.UTC)
    print("ipsecstack xform benchmark")
    for k, v in machine.items():
        print(f"  {k:<22} {v}")
    print(f"  {'packets per rep':<22} {n} (best of {reps}), sizes {', '.join(map(str, sizes))} bytes")
    print(f"  ratio = datapath pps / ceiling pps; overhead = datapath - ceiling time per packet; goal < {GOAL_US} us")
    print()
    print(header())

    rows: list[Row] = []
    t0 = time.perf_counter()
    for case in cases:
        for size in sizes:
            for row in bench_case(case, size, n, reps):
                rows.append(row)
                print(format_row(row), flush=True)
    if only in (None, "aes128gcm16"):
        for row in bench_datapath(1400, n, reps):
            rows.append(row)
            print(format_row(row), flush=True)
    elapsed = time.perf_counter() - t0

    met = sum(r.meets_goal for r in rows)
    print(f"\n{met}/{len(rows)} rows meet the < {GOAL_US} us overhead goal; run took {elapsed:.0f} s")

    out = args.json
    if out is None:
        out = Path(__file__).resolve().parent / "results" / f"xform-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "xform",
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": machine,
        "config": {"n": n, "reps": reps, "sizes": list(sizes), "quick": args.quick, "only": only, "batch": BATCH},
        "goal_overhead_us": GOAL_US,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
