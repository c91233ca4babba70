#!/usr/bin/env python3
"""Fuzz harness for the native engine's inbound parser, differential against the Python engine.

Each input is read as a small program: an SA configuration (transform, mode, ESN, UDP encapsulation,
outer IP version, window size and position), then a few packets, each one raw bytes, a genuine ESP
packet, or an ESP packet sealed with a valid ICV around arbitrary plaintext (so the fuzzer gets past
the ICV, to the padding, next header, inner length, ECN and transport-checksum code), then maybe
mutated (bit flip, truncation, overwritten bytes, appended junk). Both engines unprotect the packets in
order from the same SA state; their results (inner packet bytes, or the drop reason) and counters
must be identical. A few inputs also protect arbitrary bytes with both engines. The native engine must
never crash; under tests/native/run_sanitized.sh it must not touch a byte it should not.

Run (from the repository root, with the extension built):

    python tests/native/fuzz_unprotect.py -max_total_time=50            # atheris, < 60 s
    python tests/native/fuzz_unprotect.py -max_total_time=3600 /tmp/c   # longer, keeping a corpus dir
    python tests/native/fuzz_unprotect.py --random 50 [SEED]            # no atheris: seeded random inputs
    python tests/native/fuzz_unprotect.py --corpus /tmp/c               # replay a corpus, once each
    python tests/native/fuzz_unprotect.py --replay HEX                  # one input, to debug it
    bash tests/native/run_sanitized.sh --fuzz 50                        # with ASan + UBSan, see there

atheris (``pip install atheris``) is guided by the coverage of the Python reference, whose branches
mirror the C engine's one for one; the extension itself is not instrumented (gcc cannot build
libFuzzer instrumentation). tests/native/test_native_fuzz.py runs ``one_input`` in the test suite,
driven by hypothesis.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if not {"--random", "--replay", "--corpus"} & set(sys.argv):
        import atheris  # type: ignore[import-not-found]

        with atheris.instrument_imports(include=["ipsecstack"]):  # coverage of the Python reference
            import ipsecstack.datapath  # noqa: F401 - imports (and instruments) the whole engine

from ipsecstack import SecurityAssociation, native, seeded_rng
from ipsecstack.crypto.registry import parse_esp_transform
from tests.native.native_helpers import GW, SPI, packed, reference_protect, reference_unprotect, udp_packet

FUZZ_TRANSFORMS = ("aes128gcm16", "chacha20poly1305", "aes128-sha256", "aes256-sha384", "null-sha256")
WINDOWS = (0, 32, 64, 1024)
TOPS = (0, 1, 100, 0xFFFFFFF0, (1 << 32) + 3)


class Input:
    """Bytes read front to back; reading past the end gives zeros, so every input is a valid program."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def number(self, n: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(n)), "big")

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def pick(self, options: tuple[Any, ...]) -> Any:
        return options[self.byte() % len(options)]


@functools.cache
def _key(transform: str) -> bytes:
    return seeded_rng(3)(parse_esp_transform(transform).key_len)


class Case:
    """One SA configuration in both engines: Python tx/rx and the native engine with the same SAs."""

    def __init__(self, inp: Input) -> None:
        self.transform: str = inp.pick(FUZZ_TRANSFORMS)
        bits = inp.byte()
        self.mode = "transport" if bits & 1 else "tunnel"
        self.esn = bool(bits & 2)
        self.udp = bool(bits & 4)
        self.outer = 6 if bits & 8 else 4
        top: int = inp.pick(TOPS)
        if not self.esn:
            top &= 0xFFFFFFFF
        kw: dict[str, Any] = dict(esn=self.esn, udp_encap=(4500, 4500) if self.udp else None)
        kw["replay_window"] = inp.pick(WINDOWS)
        if self.mode == "tunnel":
            kw.update(tunnel_src=GW[self.outer][0], tunnel_dst=GW[self.outer][1], ecn=inp.pick(("normal", "compat")))
        key = _key(self.transform)
        self.tx = SecurityAssociation(SPI, "esp", self.mode, self.transform, key, direction="out",  # type: ignore[arg-type]
                                      rng=seeded_rng(9), **kw)  # fmt: skip
        self.rx = SecurityAssociation(SPI, "esp", self.mode, self.transform, key, direction="in", **kw)  # type: ignore[arg-type]
        self.rx.replay.top = top
        self.tx.seq = max(0, top - 2)
        self.engine = native.Engine()
        self.engine.install_sa(self.tx, rng=seeded_rng(9))
        self.engine.install_sa(self.rx)
        self.sealer = SecurityAssociation(SPI, "esp", self.mode, self.transform, key, rng=seeded_rng(5), **kw)  # type: ignore[arg-type]

    def outer_header(self, body: bytes, proto: int) -> bytes:
        """An outer (tunnel) or own (transport) IP header in front of ``body``."""
        src, dst = (packed(a) for a in GW[self.outer])
        if self.outer == 6:
            return struct.pack("!IHBB", 0x60000000, len(body), proto, 64) + src + dst + body
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, proto, 0, src, dst))
        s = sum(struct.unpack("!10H", hdr))
        s = (s & 0xFFFF) + (s >> 16)
        hdr[10:12] = (~((s & 0xFFFF) + (s >> 16)) & 0xFFFF).to_bytes(2, "big")
        return bytes(hdr) + body

    def sealed(self, inp: Input) -> bytes:
        """ESP with a valid ICV around plaintext the input chooses (the trailer included)."""
        ctx = self.sealer.ctx
        assert ctx is not None
        seq = max(0, self.rx.replay.top + inp.number(1) - 64)
        plaintext = self.inner(inp) + inp.take(inp.byte() % 24)
        if len(plaintext) < 2:
            plaintext += bytes(2)
        plaintext = plaintext[:-2] + bytes((inp.byte() % 40 if inp.byte() & 1 else 0, inp.pick((4, 41, 6, 17, 59, 0))))
        if ctx.block == 16:
            plaintext += bytes(-len(plaintext) % 16)
        header = struct.pack("!II", SPI, seq & 0xFFFFFFFF)
        esp = ctx.seal_packet(b"", header, seq, (seq >> 32).to_bytes(4, "big") if self.esn else b"", plaintext)
        udp = self.udp != bool(inp.byte() & 0x80)  # sometimes the wrong encapsulation
        if udp:
            return self.outer_header(struct.pack("!HHHH", 4500, 4500, 8 + len(esp), 0) + esp, 17)
        return self.outer_header(esp, 50)

    def inner(self, inp: Input) -> bytes:
        version = 6 if inp.byte() & 1 else 4
        return udp_packet(version, inp.byte() % 64, tos=inp.byte(), transport=self.mode == "transport")

    def genuine(self, inp: Input) -> bytes:
        self.sealer.seq = max(0, self.rx.replay.top + inp.number(1) - 64)
        out = reference_protect(self.sealer, self.inner(inp))
        return out if isinstance(out, bytes) else b""


def mutate(pkt: bytes, inp: Input) -> bytes:
    how = inp.byte() % 6
    if how == 0 or not pkt:
        return pkt
    buf = bytearray(pkt)
    at = inp.number(2) % len(buf)
    if how == 1:
        buf[at] ^= 1 << (inp.byte() % 8)
    elif how == 2:
        del buf[at:]
    elif how == 3:
        buf[at : at + 2] = inp.take(2)
    elif how == 4:
        buf += inp.take(inp.byte() % 32)
    else:
        buf[1] ^= inp.byte() & 0x33  # ECN / traffic class bits of either IP version
    return bytes(buf)


class ReferenceCrash(Exception):
    """The Python reference raised something other than Dropped: its bug, reported, not compared."""


def _ref(fn: Callable[[], bytes | str]) -> bytes | str:
    try:
        return fn()
    except Exception as e:
        raise ReferenceCrash(f"{type(e).__name__}: {e}") from e


def one_input(data: bytes) -> None:
    """Run one fuzz input; raises AssertionError when the engines disagree."""
    inp = Input(data)
    case = Case(inp)
    for _ in range(1 + inp.byte() % 4):
        kind = inp.byte() % 8
        if kind == 7:  # outbound: arbitrary bytes as an inner packet
            raw = mutate(case.inner(inp), inp) if inp.byte() & 1 else inp.take(inp.byte())
            ref = _ref(lambda raw=raw: reference_protect(case.tx, raw))  # type: ignore[misc]
            assert case.engine.protect(SPI, [raw]) == [ref], raw.hex()
            continue
        if kind < 2:
            pkt = inp.take(inp.number(1))
        elif kind < 4:
            pkt = mutate(case.genuine(inp), inp)
        else:
            pkt = mutate(case.sealed(inp), inp)
        ref = _ref(lambda pkt=pkt: reference_unprotect({SPI: case.rx}, pkt))  # type: ignore[misc]
        got = case.engine.unprotect([pkt])
        assert got == [ref], (case.transform, case.mode, case.esn, case.udp, case.outer, pkt.hex())
    for direction, sa in (("in", case.rx), ("out", case.tx)):
        st = case.engine.sa_stats(direction, SPI)
        assert (st["packets"], st["bytes"]) == (sa.packets, sa.bytes), direction
    assert case.engine.sa_stats("in", SPI)["replay_top"] == case.rx.replay.top


def atheris_entry(data: bytes) -> None:
    # a crash of the Python reference is a finding about it, not about the native engine: --replay shows it
    with contextlib.suppress(ReferenceCrash):
        one_input(data)


def _random_run(seconds: float, seed: int) -> int:
    import random
    import time

    rnd = random.Random(seed)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        data = rnd.randbytes(rnd.randrange(1, 400))
        try:
            one_input(data)
        except ReferenceCrash as e:
            print(f"reference crash on {data.hex()}: {e}", file=sys.stderr)
        except AssertionError:
            print(f"engines disagree on input {data.hex()}", file=sys.stderr)
            raise
        n += 1
    print(f"{n} random inputs, no disagreement (seed {seed})")
    return 0


def main(argv: list[str]) -> int:
    if not native.available:
        print(f"native engine not built: {native.why_not}", file=sys.stderr)
        return 2
    if len(argv) > 1 and argv[1] == "--random":
        return _random_run(float(argv[2]) if len(argv) > 2 else 50.0, int(argv[3]) if len(argv) > 3 else 1)
    if len(argv) > 2 and argv[1] == "--replay":
        one_input(bytes.fromhex(argv[2]))
        return 0
    if len(argv) > 2 and argv[1] == "--corpus":
        files = sorted(p for p in Path(argv[2]).iterdir() if p.is_file())
        for f in files:
            try:
                one_input(f.read_bytes())
            except ReferenceCrash as e:
                print(f"reference crash on {f}: {e}", file=sys.stderr)
        print(f"{len(files)} corpus inputs, no disagreement")
        return 0
    import atheris

    atheris.Setup(argv, atheris_entry)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
