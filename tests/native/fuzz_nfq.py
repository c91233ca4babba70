#!/usr/bin/env python3
"""Fuzz harness for the native NFQUEUE netlink parser (ipsecstack/native/nfq.c), differential.

Each input is a netlink datagram as the kernel's nfnetlink_queue could send it: either raw bytes, or
well-formed NFQNL_MSG_PACKET / NLMSG_ERROR messages (built here from the input's bytes) that are then
mutated (bit flips, truncation, overwritten bytes, appended junk). The engine's ``nfq_parse`` must
never crash and must agree, message for message, with :func:`reference_parse`, a plain Python reading
of <linux/netfilter/nfnetlink_queue.h>. Under tests/native/run_sanitized.sh it must not read a byte
outside the datagram.

    python tests/native/fuzz_nfq.py -max_total_time=50     # atheris (coverage of this reference)
    python tests/native/fuzz_nfq.py --random 20 [SEED]     # no atheris: seeded random inputs for N seconds

tests/native/test_native_nfq.py runs ``one_input`` in the suite (hypothesis and a seeded loop).
"""

from __future__ import annotations

import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
MSG_PACKET = (3 << 8) | 0  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET
NFQA_PACKET_HDR, NFQA_MARK, NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 1, 3, 10, 13, 14


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def packet_msg(queue: int, pid: int, payload: bytes | None, *, mark: int | None = None, cap_len: int | None = None,
               extra: bytes = b"", skbinfo: int | None = None) -> bytes:  # fmt: skip
    body = struct.pack("!BBH", 0, 0, queue) + attr(NFQA_PACKET_HDR, struct.pack("!IHB", pid, 0x0800, 3))
    if mark is not None:
        body += attr(NFQA_MARK, struct.pack("!I", mark))
    body += extra
    if payload is not None:
        body += attr(NFQA_PAYLOAD, payload)
    if cap_len is not None:
        body += attr(NFQA_CAP_LEN, struct.pack("!I", cap_len))
    if skbinfo is not None:
        body += attr(NFQA_SKB_INFO, struct.pack("!I", skbinfo))
    msg = struct.pack("=IHHII", 16 + len(body), MSG_PACKET, 0, 0, 0) + body
    return msg + bytes(-len(msg) % 4)


def error_msg(errno: int) -> bytes:
    body = struct.pack("=i", -errno) + struct.pack("=IHHII", 16, 0, 0, 0, 0)
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, 0, 0, 0) + body


def reference_parse(data: bytes) -> list[tuple[Any, ...]]:
    """What nfq_parse must return for ``data``."""
    out: list[tuple[Any, ...]] = []
    off = 0
    while off < len(data):
        if len(data) - off < 16:
            out.append(("malformed",))
            break
        mlen, mtype = struct.unpack_from("=IH", data, off)
        if mlen < 16 or mlen > len(data) - off:
            out.append(("malformed",))
            break
        body = data[off + 16 : off + mlen]
        off = min(off + ((mlen + 3) & ~3), len(data))
        if mtype == NLMSG_ERROR:
            if len(body) < 4:
                out.append(("malformed",))
                break
            (err,) = struct.unpack_from("=i", body)
            out.append(("error", min(abs(err), 2**31 - 1)))
            continue
        if mtype != MSG_PACKET:
            out.append(("other",))
            continue
        if len(body) < 4:
            out.append(("malformed",))
            break
        queue = int.from_bytes(body[2:4], "big")
        pid: int | None = None
        payload: bytes | None = None
        cap_len, mark, skbinfo, bad = 0, None, 0, False
        a, pos = body[4:], 0
        while pos + 4 <= len(a):
            alen, kind = struct.unpack_from("=HH", a, pos)
            kind &= 0x3FFF
            if alen < 4 or alen > len(a) - pos:
                bad = True
                break
            value = a[pos + 4 : pos + alen]
            if kind == NFQA_PACKET_HDR:
                if len(value) < 7:
                    bad = True
                    break
                pid = int.from_bytes(value[:4], "big")
            elif kind == NFQA_PAYLOAD:
                payload = value
            elif kind in (NFQA_CAP_LEN, NFQA_MARK, NFQA_SKB_INFO):
                if len(value) < 4:
                    bad = True
                    break
                if kind == NFQA_CAP_LEN:
                    cap_len = int.from_bytes(value[:4], "big")
                elif kind == NFQA_MARK:
                    mark = int.from_bytes(value[:4], "big")
                else:
                    skbinfo = int.from_bytes(value[:4], "big")
            pos += (alen + 3) & ~3
        if pid is None:
            out.append(("malformed",))
            break
        out.append(("bad_packet" if bad else "packet", queue, pid, payload, cap_len, mark, skbinfo))
    return out


def build(data: bytes) -> bytes:
    """An input read as: a seed for well-formed messages, then mutations of them."""
    if not data:
        return b""
    rnd = random.Random(data)
    if data[0] & 1:
        return data[1:]  # raw bytes
    msgs = b""
    for _ in range(1 + data[0] % 4):
        choice = rnd.randrange(4)
        if choice == 0:
            msgs += error_msg(rnd.randrange(0, 200))
        else:
            payload = rnd.randbytes(rnd.randrange(0, 200)) if choice != 3 else None
            msgs += packet_msg(rnd.randrange(1 << 16), rnd.getrandbits(32), payload,
                               mark=rnd.getrandbits(32) if rnd.random() < 0.5 else None,
                               cap_len=rnd.randrange(1 << 17) if rnd.random() < 0.3 else None,
                               skbinfo=rnd.randrange(8) if rnd.random() < 0.3 else None,
                               extra=attr(rnd.randrange(1 << 16), rnd.randbytes(rnd.randrange(9))))  # fmt: skip
    buf = bytearray(msgs)
    for _ in range(rnd.randrange(4)):
        how = rnd.randrange(4)
        if how == 0 and buf:
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
        elif how == 1:
            del buf[rnd.randrange(len(buf) + 1) :]
        elif how == 2 and buf:
            i = rnd.randrange(len(buf))
            buf[i : i + 2] = rnd.randbytes(2)
        else:
            buf += rnd.randbytes(rnd.randrange(8))
    return bytes(buf)


def one_input(data: bytes) -> None:
    from ipsecstack.native import _engine  # here: the module imports where the extension is not built

    dgram = build(data)
    got = _engine.nfq_parse(dgram)
    want = reference_parse(dgram)
    assert got == want, (dgram.hex(), got, want)


def main() -> None:
    if "--random" in sys.argv:
        i = sys.argv.index("--random")
        seconds = float(sys.argv[i + 1]) if len(sys.argv) > i + 1 else 20.0
        rnd = random.Random(int(sys.argv[i + 2]) if len(sys.argv) > i + 2 else 1)
        deadline, n = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            one_input(rnd.randbytes(rnd.randrange(1, 400)))
            n += 1
        print(f"{n} inputs, no disagreement")
        return
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
