#!/usr/bin/env python3
"""Fuzz harness for the native forwarder: arbitrary datagrams into a running forwarder's sockets.

A rig of two peers on loopback (tests/native/fwd_helpers.py: socketpair "TUN"s, UDP sockets on
127.0.0.1) runs both forwarders for the whole session, with the A->B flow of ``PKT`` learned, plus an
extra inbound SA at B (``SPI_FZ``) whose Python twin seals arbitrary plaintext, so inputs get past the
ICV into the trailer, next-header, inner-length and flow-key code. Each input is read as a small program
of steps; each step, chosen by a byte, is one of:

- raw bytes sent to B's UDP socket (IKE marker, keepalive, short, anything);
- an ESP header with a known SPI and arbitrary bytes after it (refused by the ICV check);
- a genuine ESP-in-UDP payload sealed around arbitrary plaintext, maybe mutated (bit flip, truncation);
- raw bytes written into A's inner socketpair (flow keys, uncacheable packets, protect of garbage).

The forwarders must never crash (under tests/native/run_sanitized.sh: never touch a byte they should
not) and must still forward afterwards (``check_alive``). Punts are drained after every input.

Run (from the repository root, with the extension built):

    python tests/native/fuzz_datagram.py -max_total_time=50     # atheris
    python tests/native/fuzz_datagram.py --random 30 [SEED]     # no atheris: seeded random inputs

tests/native/test_native_fwd_fuzz.py runs a bounded number of random inputs in the test suite.
"""

from __future__ import annotations

import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipsecstack import Dropped, SecurityAssociation
from ipsecstack.xform import esp as esp_xform
from tests.native.fwd_helpers import LOOP, SPI_AB, peers, wait_until
from tests.native.native_helpers import key_for, udp_packet

SPI_FZ = 0x0F0F0F0F
PKT = udp_packet(4, 64)


class Rig:
    """Both forwarders, running for the whole session (see the module docstring)."""

    def __init__(self) -> None:
        self._cm = peers()
        self.a, self.b = self._cm.__enter__()
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind((LOOP, 0))
        encap = (self.sender.getsockname()[1], self.b.port.port)
        key = key_for("aes128gcm16", 99)
        opts: dict[str, Any] = dict(tunnel_src=LOOP, tunnel_dst=LOOP, udp_encap=encap, replay_window=0)
        self.sealer = SecurityAssociation(SPI_FZ, "esp", "tunnel", "aes128gcm16", key, direction="out", **opts)
        self.b.engine.install_sa(
            SecurityAssociation(SPI_FZ, "esp", "tunnel", "aes128gcm16", key, direction="in", **opts)
        )
        a, b = self.a, self.b
        a.send_inner(PKT)
        wait_until(lambda: bool(a.engine.take_punts()), what="the first punt")
        a.engine.learn_out(PKT, SPI_AB)
        b.engine.learn_in(SPI_AB, PKT)

    def drain(self) -> int:
        return len(self.a.engine.take_punts(max=100000)) + len(self.b.engine.take_punts(max=100000))

    def check_alive(self) -> None:
        """PKT still goes A -> B on the fast path (garbage did not stop either thread)."""
        while self.b.recv_inner(0) is not None:
            pass
        self.a.send_inner(PKT)
        got = self.b.recv_inner(5)
        assert got == PKT, f"the forwarder stopped forwarding: {got!r}"

    def close(self) -> None:
        self.sender.close()
        self._cm.__exit__(None, None, None)


_rig: Rig | None = None


def rig() -> Rig:
    global _rig
    if _rig is None:
        _rig = Rig()
    return _rig


def _sealed(r: Rig, plaintext: bytes) -> bytes | None:
    """An ESP-in-UDP payload for SPI_FZ around ``plaintext`` as a tunnel-mode inner packet."""
    try:
        pkt = esp_xform.protect(r.sealer, plaintext)
    except Dropped:
        return None
    return pkt[28:]  # after the outer IPv4 and UDP headers


def _inner(v4: bool, body: bytes) -> bytes:
    if v4:
        hdr = bytearray(body[:20].ljust(20, b"\0"))
        hdr[0] = 0x45
        pkt = hdr + body[20:]
        pkt[2:4] = len(pkt).to_bytes(2, "big")
        return bytes(pkt)
    hdr = bytearray(body[:40].ljust(40, b"\0"))
    hdr[0] = 0x60 | (hdr[0] & 0x0F)
    pkt = hdr + body[40:]
    pkt[4:6] = (len(pkt) - 40).to_bytes(2, "big")
    return bytes(pkt)


def one_input(data: bytes) -> None:
    r = rig()
    b_addr = (LOOP, r.b.port.port)
    pos = 0
    for _ in range(4):
        if pos + 2 > len(data):
            break
        op, n = data[pos], data[pos + 1] * 2
        body = data[pos + 2 : pos + 2 + n]
        pos += 2 + n
        if op % 4 == 0:
            r.sender.sendto(body, b_addr)
        elif op % 4 == 1:
            r.sender.sendto(SPI_AB.to_bytes(4, "big") + body, b_addr)
        elif op % 4 == 2:
            # an inner packet whose length field is right, the rest (protocol, flags, ports) arbitrary
            inner = _inner(op & 8 == 0, body)
            sealed = _sealed(r, inner)
            if sealed is None:
                continue
            if op & 16 and sealed:
                i = body[0] % len(sealed) if body else 0
                sealed = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
            if op & 32:
                sealed = sealed[: len(sealed) - (op % 7)]
            r.sender.sendto(sealed, b_addr)
        else:
            r.a.app.send(body)
    r.drain()


def run_random(seconds: float, seed: int, check_every: int = 200) -> int:
    rnd = random.Random(seed)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        one_input(rnd.randbytes(rnd.randrange(2, 400)))
        n += 1
        if n % check_every == 0:
            time.sleep(0.05)
            rig().drain()
            rig().check_alive()
    time.sleep(0.1)
    rig().drain()
    rig().check_alive()
    return n


def main(argv: list[str]) -> int:
    if "--random" in argv:
        i = argv.index("--random")
        secs = float(argv[i + 1]) if len(argv) > i + 1 else 30.0
        seed = int(argv[i + 2]) if len(argv) > i + 2 else 1
        n = run_random(secs, seed)
        print(f"fuzz_datagram: {n} random inputs in {secs:.0f}s (seed {seed}), forwarders alive")
        rig().close()
        return 0
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
