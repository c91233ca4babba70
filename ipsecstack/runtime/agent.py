"""Assemble a running node from a configuration: backends by name, the datapath, the node."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from ipsecstack.config import Config, build_datapath
from ipsecstack.datapath import Datapath
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
        for child in peer.children:
            if child.mode == "tunnel":
                routes += [n for r in child.remote_ts for n in r.networks() if n not in routes]
    return routes


def local_address(cfg: Config) -> str:
    if cfg.manual:
        return cfg.manual[0].local_addr
    return cfg.connections[0].local_addr


def attach_ike(cfg: Config, node: Node, *, log: Any = None) -> Any:
    """Create the IKE endpoint for ``[connections]`` (None without any) and hook it to the node."""
    if not cfg.connections:
        return None
    from ipsecstack.runtime.ike import IkeEndpoint

    encap = node.outer if hasattr(node.outer, "send_ike") else None
    if encap is not None:
        # ESP leaves through the UDP socket only: make every IKE SA negotiate UDP encapsulation
        for peer in cfg.connections:
            peer.encap = True
    ike = IkeEndpoint(node, cfg.connections, cfg.start, encap=encap, log=log or node.log, traps=node.traps,
                      acquire_names=cfg.trap)  # fmt: skip
    node.on_start.append(ike.start)
    node.on_stop.append(ike.close)
    return ike


def install_traps(cfg: Config, dp: Datapath) -> dict[tuple[str, str], int]:
    """Policies for every IKE child with a known peer, installed before negotiation (xfrm-style trap
    policies); returns their reqids by (conn, child). Traffic they match is protected or dropped, never
    sent in clear; for ``start_action = trap`` it also triggers the negotiation (acquire)."""
    from ipsecstack.ike.install import trap_policies

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
        from backends.nfqueue import NfqueueTransport

        nfq = NfqueueTransport.from_config(cfg, dp)
        node = Node(dp, queue_out=nfq.out_port, queue_in=nfq.in_port, batch_size=a.batch_size, log=log)
        node.traps = traps
        return node
    inner: PacketPort
    if a.inner_backend == "tun":
        from backends.tun import TunPort

        mtu = a.tun_mtu or DEFAULT_LINK_MTU - overhead
        inner = TunPort(a.tun_name, mtu=mtu, addresses=a.tun_addrs, routes=tunnel_routes(cfg))
    else:
        raise BackendError("inner_backend = 'memory' is for tests and the demo; it cannot be run as a daemon")
    local = local_address(cfg)
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
    node = Node(dp, inner, outer, batch_size=a.batch_size, log=log)
    node.traps = traps
    return node


def attach_control(cfg: Config, node: Node, ike: Any, *, log: Any = None) -> Any:
    """Serve the control socket while the node runs."""
    import asyncio

    from ipsecstack.runtime.control import ControlServer

    server = ControlServer(cfg.agent.control_socket, node, ike, log or node.log)

    def start() -> None:
        task = asyncio.get_running_loop().create_task(server.start())
        node.control_task = task  # keep a reference while it runs

    node.on_start.append(start)
    node.on_stop.append(server.close)
    if cfg.agent.metrics:
        from ipsecstack.runtime.metrics import serve

        try:
            http = serve(cfg.agent.metrics, node, ike)
        except OSError as e:
            raise BackendError(f"agent.metrics = {cfg.agent.metrics!r}: cannot listen there: {e.strerror}") from None
        node.on_stop.append(http.shutdown)
    return server
