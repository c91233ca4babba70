"""Assemble a running node from a configuration: backends by name, the datapath, the node."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

from ipsecstack.config import Config, build_datapath
from ipsecstack.datapath import Datapath
from ipsecstack.ike.install import trap_policies
from ipsecstack.runtime.io import BackendError, PacketPort
from ipsecstack.runtime.node import Node

DEFAULT_LINK_MTU = 1500
# IPv4 + UDP + ESP header + CBC IV + padding + trailer + 256-bit ICV, rounded up
IKE_OVERHEAD = 100
# reqids of trap policies; children negotiated without a trap count up from 1
TRAP_REQID_BASE = 1 << 20


def tunnel_routes(cfg: Config) -> list[str]:
    """Remote subnets of tunnel-mode connections (manual and IKE): routed into the TUN device."""
    routes: list[str] = []
    for c in cfg.manual:
        if c.mode == "tunnel":
            routes += [str(ts.dst) for ts in c.remote_ts if ts.dst is not None]
    for peer in cfg.connections:
        if peer.pools:  # a concentrator routes its clients' virtual addresses
            routes += [n for pool in peer.pools for n in pool.networks() if n not in routes]
            continue
        for child in peer.children:
            if child.mode == "tunnel":
                routes += [n for r in child.remote_ts for n in r.networks() if n not in routes]
    return routes


def local_address(cfg: Config) -> str:
    if cfg.manual:
        return cfg.manual[0].local_addr
    return cfg.connections[0].local_addr


def install_traps(cfg: Config, dp: Datapath) -> dict[tuple[str, str], int]:
    """Policies for every IKE child with a known peer, installed before negotiation (xfrm-style trap
    policies); returns their reqids by (conn, child). Traffic they match is protected or dropped, never
    sent in clear; for ``start_action = trap`` it also triggers the negotiation (acquire)."""
    reqids: dict[tuple[str, str], int] = {}
    for peer in cfg.connections:
        if peer.remote_addr is None:
            continue
        for child in peer.children:
            reqid = TRAP_REQID_BASE + len(reqids)
            reqids[(peer.name, child.name)] = reqid
            for pol in trap_policies(peer.name, peer.local_addr, peer.remote_addr, child, reqid):
                dp.spd.add(pol)
    return reqids


def build_node(cfg: Config, *, now: float | None = None, log: Any = None) -> Node:
    """Create the datapath and the configured backends (this needs root for real backends)."""
    dp = build_datapath(cfg, time.monotonic() if now is None else now)
    traps = install_traps(cfg, dp)
    a = cfg.agent
    # IKE-negotiated SAs do not exist yet: assume the worst case of the transforms we support
    overhead = max((sa.overhead for sa in dp.sad), default=IKE_OVERHEAD if cfg.connections else 0)
    if a.inner_backend == "nfqueue":
        from backends.nfqueue import LocalInjector, link_mtu
        from ipsecstack.agent.nfq_rules import transport_for

        nfq = transport_for(cfg, dp)
        node = Node(dp, queue_out=nfq.out_port, queue_in=nfq.in_port, batch_size=a.batch_size, log=log)
        node.traps = traps
        # RFC 4301 §8: the host's packets grow by the ESP/AH overhead after the kernel chose their size, so
        # oversized ones that may not be fragmented come back to their socket as ICMP with the smaller MTU
        dp.link_mtu = link_mtu
        node.local_out = LocalInjector()
        node.on_stop.append(node.local_out.close)
        if dp.native is not None:
            from ipsecstack.agent.engine import queue_forwarder

            # the native engine's threads answer the queues; the Node answers what they ask (DESIGN.md §4a)
            node.forwarder = queue_forwarder(
                node,
                offloads=a.offloads,
                tcp=nfq.tcp_port,
                io=nfq.engine_io,
            )
        node.on_stop.append(nfq.close_engine_io)  # (after the forwarder stopped: Node.stop runs it first)
        return node
    inner: PacketPort
    if a.inner_backend == "tun":
        from backends.tun import TunPort

        mtu = a.tun_mtu or DEFAULT_LINK_MTU - overhead
        # TCP super-packets (TSO) read and coalesced ones written through the virtio header: the native
        # forwarder in C, the Python datapath (and what the forwarder punts) in backends/tun_offload.py
        inner = TunPort(a.tun_name, mtu=mtu, addresses=a.tun_addrs, routes=tunnel_routes(cfg),
                        vnet_hdr=a.offloads, txqueuelen=a.tun_txqueuelen)  # fmt: skip
    else:
        raise BackendError("inner_backend = 'memory' is for tests and the demo; it cannot be run as a daemon")
    local = local_address(cfg)
    family = ipaddress.ip_address(local).version
    outer: PacketPort
    try:
        if a.outer_backend == "udp":
            from backends.udp import UdpEncapPort

            outer = UdpEncapPort(local, a.encap_port, offloads=a.offloads)
        elif a.outer_backend == "raw":
            from backends.rawsock import RawPort

            outer = RawPort(family, local=local)
            if cfg.connections or any(c.encap for c in cfg.manual):
                # the outer plane is a set of ports, as in the kernel: ESP/AH in IP, and ESP in UDP (with
                # IKE on 4500) for the SAs that cross a NAT
                from backends.outer import OuterSet
                from backends.udp import UdpEncapPort

                try:
                    outer = OuterSet(outer, UdpEncapPort(local, a.encap_port, offloads=a.offloads))
                except BaseException:
                    outer.close()
                    raise
        else:
            raise BackendError(f"outer_backend = {a.outer_backend!r} cannot be combined with inner_backend = 'tun'")
    except BaseException:
        inner.close()
        raise
    node = Node(dp, inner, outer, batch_size=a.batch_size, log=log)
    node.traps = traps
    if a.tun_txqueuelen is None and a.tun_queue_kb > 0:
        from backends.tun_queue import QueueSizer

        sizer = QueueSizer(a.tun_name, budget=a.tun_queue_kb * 1024, log=node.log)
        node.on_start.append(lambda: sizer.start(asyncio.get_running_loop()))
        node.on_stop.append(sizer.stop)
        node.tun_queue = sizer
    if dp.native is not None:
        from ipsecstack.agent.engine import tun_forwarder

        # the native engine's threads carry the packets; the Node answers what they ask (DESIGN.md §4a)
        node.forwarder = tun_forwarder(node, offloads=a.offloads, codel_ms=(a.codel_target_ms, a.codel_interval_ms))
    return node
