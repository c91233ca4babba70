#!/usr/bin/env python3
"""One peer of the native-forwarder netns test: a TUN device, an outer port and an engine's forwarder.

Runs inside a namespace (tests/netns/test_native_fwd_netns.py starts it with ``ip netns exec``). The
engine holds one tunnel-mode SA pair; this script plays the daemon's part in the smallest way: it
answers the engine's punts (``out``: protect with the engine, write to the outer port, learn the flow;
``in``: write to the TUN, learn the flow; ``outer``: count) and drains lifetime events, until SIGTERM or
its stdin closes; then it prints the forwarder's counters as one JSON line and exits.

    fwd_peer.py OUTER LOCAL REMOTE TUN_ADDR REMOTE_NET SPI_OUT KEY_OUT SPI_IN KEY_IN
    (OUTER: udp | esp; keys in hex)
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backends.rawsock import RawPort
from backends.tun import TunPort
from backends.udp import UdpEncapPort
from ipsecstack import native

TRANSFORM = "aes128gcm16"


def raw_fds(port: RawPort) -> tuple[int, int]:
    """(ESP receive fd, IPPROTO_RAW send fd) of a RawPort made for protocol 50 only."""
    fds = getattr(port, "receive_fds", None)
    if fds is not None:
        rx = next(fd for proto, fd in fds() if proto == 50)
        return rx, port.send_fd()  # type: ignore[attr-defined]
    return port._rx[0].fileno(), port._tx.fileno()


def main(argv: list[str]) -> int:
    outer_kind, local, remote, tun_addr, remote_net, spi_out, key_out, spi_in, key_in = argv[1:10]
    tun = TunPort(f"fwd{os.getpid() % 10000}", mtu=1400, addresses=[tun_addr], routes=[remote_net])
    encap = (4500, 4500) if outer_kind == "udp" else None
    port: Any
    if outer_kind == "udp":
        port = UdpEncapPort(local, 4500)
        fds = [("udp4", port.fileno())]
    else:
        port = RawPort(4, local=local, protocols=(50,))
        rx, tx = raw_fds(port)
        fds = [("esp4", rx), ("raw4", tx)]
    eng = native.Engine()
    common: dict[str, Any] = dict(udp_encap=encap, mode="tunnel")
    eng.install(int(spi_out), "out", TRANSFORM, bytes.fromhex(key_out), tunnel_src=_packed(local),
                tunnel_dst=_packed(remote), **common)  # fmt: skip
    eng.install(int(spi_in), "in", TRANSFORM, bytes.fromhex(key_in), tunnel_src=_packed(remote),
                tunnel_dst=_packed(local), **common)  # fmt: skip
    os.set_blocking(tun.fileno(), False)
    efd = eng.fwd_start(tun.fileno(), fds, batch=64)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    handled = {"out": 0, "in": 0, "outer": 0}
    print("ready", flush=True)
    while not stop:
        try:
            r, _, _ = select.select([efd, sys.stdin], [], [], 0.2)
        except InterruptedError:
            continue
        if sys.stdin in r and not sys.stdin.readline():
            break
        eng.poll_events()
        for p in eng.take_punts(1024):
            handled[p[0]] += 1
            if p[0] == "out":
                res = eng.protect(int(spi_out), [p[1]])
                if isinstance(res[0], bytes):
                    port.write_batch(res)
                eng.learn_out(p[1], int(spi_out))
            elif p[0] == "in":
                tun.write_batch([p[2]])
                eng.learn_in(p[1], p[2])
    st = eng.fwd_stats()
    eng.fwd_stop()
    st["handled"] = handled
    st["engine"] = eng.stats()
    print(json.dumps(st), flush=True)
    port.close()
    tun.close()
    return 0


def _packed(addr: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(addr).packed


if __name__ == "__main__":
    sys.exit(main(sys.argv))
