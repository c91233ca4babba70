"""A load generator of IKEv2 handshakes: many IKE_SA_INIT + IKE_AUTH exchanges against one responder.

Runs inside namespace A (``ip netns exec A python -m bench.suite.hsload ...``) and prints one JSON object.
It is the sans-IO ``IkeManager`` of ipsecstack, driven by a small selector loop over UDP 500 and 4500 (the
non-ESP marker of RFC 3948 §2.2 on 4500, where kernel-libipsec's faked NAT detection makes IKE float):
``count`` IKE SAs of the connection in ``paths.CONFIG`` (side "a"), at most ``window`` of them in flight,
each with its child SA. It sends no DELETE at the end: the responder keeps the IKE SAs, idle, so that its
memory per SA can be read afterwards. Bounded by ``--timeout``; retransmissions and cookies (RFC 7296 §2.6)
are the manager's own.

The initiator costs about as much CPU as the responder; on a 2-core machine the rate it measures is the
slower of the two (``handshake.py`` reports the responder's CPU use so a reader can tell which).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.suite.paths import ipsecstack_config
from ipsecstack.config import parse
from ipsecstack.entropy import system_rng
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import IkeDown, IkeUp

MARKER = b"\x00\x00\x00\x00"  # RFC 3948 §2.2: non-ESP marker before IKE on 4500


def run(local: str, remote: str, count: int, window: int, timeout: float) -> dict[str, object]:
    cfg = parse(ipsecstack_config(local, remote, "a", "/nonexistent.sock", start="none"))
    mgr = IkeManager(cfg.connections, system_rng)
    socks: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    try:
        for port in (500, 4500):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            s.bind((local, port))
            s.setblocking(False)
            socks[port] = s
            sel.register(s, selectors.EVENT_READ, port)
        started = up = failed = 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = ru0.ru_utime + ru0.ru_stime
        t0 = time.monotonic()
        last_up = t0
        deadline = t0 + timeout

        def flush() -> None:
            for d in mgr.datagrams():
                data = MARKER + d.data if d.src_port == 4500 else d.data
                with contextlib.suppress(OSError):
                    socks[4500 if d.src_port == 4500 else 500].sendto(data, (d.dst, d.dst_port))

        while up + failed < count and time.monotonic() < deadline:
            now = time.monotonic()
            while started - up - failed < window and started < count:
                mgr.initiate("bench", now)
                started += 1
            flush()
            for ev in mgr.events():
                if isinstance(ev, IkeUp):
                    up += 1
                    last_up = time.monotonic()
                elif isinstance(ev, IkeDown):
                    failed += 1
            mgr.failures.clear()
            flush()
            timer = mgr.get_timer()
            wait = 0.5 if timer is None else min(0.5, max(0.0, timer - time.monotonic()))
            if started - up - failed < window and started < count:
                wait = 0.0  # room for another initiation: only look at what has arrived
            for key, _ in sel.select(wait):
                sock, port = key.fileobj, key.data
                assert isinstance(sock, socket.socket)
                for _ in range(256):  # drain, bounded
                    try:
                        data, (src, sport, *_rest) = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if port == 4500:
                        if not data.startswith(MARKER):
                            continue  # ESP: not ours to handle
                        data = data[4:]
                    mgr.receive(data, src, sport, port, time.monotonic())
            if timer is not None and time.monotonic() >= timer:
                mgr.handle_timer(time.monotonic())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"started": started, "established": up, "failed": failed, "seconds": last_up - t0,
                "cpu_s": ru.ru_utime + ru.ru_stime - cpu0, "timed_out": up + failed < count,
                "stats": mgr.stats}  # fmt: skip
    finally:
        sel.close()
        for s in socks.values():
            s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", required=True)
    ap.add_argument("--remote", required=True)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.local, a.remote, max(1, a.count), max(1, a.window), a.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
