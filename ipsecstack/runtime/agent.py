"""Assemble a running node from a configuration: backends by name, the datapath, the node."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from ipsecstack.config import Config, build_datapath
from ipsecstack.runtime.io import BackendError, PacketPort
from ipsecstack.runtime.node import Node

DEFAULT_LINK_MTU = 1500


def tunnel_routes(cfg: Config) -> list[str]:
    """Remote subnets of tunnel-mode connections: routed into the TUN device."""
    routes: list[str] = []
    for c in cfg.manual:
        if c.mode == "tunnel":
            routes += [str(ts.dst) for ts in c.remote_ts if ts.dst is not None]
    return routes


def build_node(cfg: Config, *, now: float | None = None, log: Any = None) -> Node:
    """Create the datapath and the configured backends (this needs root for real backends)."""
    dp = build_datapath(cfg, time.monotonic() if now is None else now)
    a = cfg.agent
    overhead = max((sa.overhead for sa in dp.sad), default=0)
    if a.inner_backend == "nfqueue":
        from backends.nfqueue import NfqueueTransport

        nfq = NfqueueTransport.from_config(cfg, dp)
        return Node(dp, queue_out=nfq.out_port, queue_in=nfq.in_port, batch_size=a.batch_size, log=log)
    inner: PacketPort
    if a.inner_backend == "tun":
        from backends.tun import TunPort

        mtu = a.tun_mtu or DEFAULT_LINK_MTU - overhead
        inner = TunPort(a.tun_name, mtu=mtu, addresses=a.tun_addrs, routes=tunnel_routes(cfg))
    else:
        raise BackendError("inner_backend = 'memory' is for tests and the demo; it cannot be run as a daemon")
    local = cfg.manual[0].local_addr
    family = ipaddress.ip_address(local).version
    outer: PacketPort
    try:
        if a.outer_backend == "udp":
            from backends.udp import UdpEncapPort

            outer = UdpEncapPort(local, a.encap_port)
        elif a.outer_backend == "raw":
            from backends.rawsock import RawPort

            outer = RawPort(family, local=local)
        else:
            raise BackendError(f"outer_backend = {a.outer_backend!r} cannot be combined with inner_backend = 'tun'")
    except BaseException:
        inner.close()
        raise
    return Node(dp, inner, outer, batch_size=a.batch_size, log=log)
