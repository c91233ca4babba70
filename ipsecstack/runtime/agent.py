"""Assemble a running node from a configuration: backends by name, the datapath, the node."""

from __future__ import annotations

import ipaddress
import os
import time
from typing import TYPE_CHECKING, Any

from ipsecstack.config import AgentConfig, Config, build_datapath
from ipsecstack.datapath import Datapath
from ipsecstack.runtime.io import BackendError, PacketPort
from ipsecstack.runtime.node import Node

if TYPE_CHECKING:
    from ipsecstack.runtime.privs import Account

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


def force_encap(cfg: Config, agent: AgentConfig | None = None) -> None:
    """``outer_backend = "udp"``: ESP leaves through the UDP socket only, so every IKE SA negotiates UDP
    encapsulation (RFC 7296 §2.23 allows faking NAT detection for that). Any other outer plane sends each
    SA the way IKE found the path: raw ESP/AH without NAT, ESP in UDP across one."""
    if (agent or cfg.agent).outer_backend == "udp":
        for peer in cfg.connections:
            peer.encap = True


def attach_ike(cfg: Config, node: Node, *, log: Any = None, user: Account | None = None) -> Any:
    """Create the IKE endpoint for ``[connections]`` (None without any) and hook it to the node.

    IKE always listens on UDP 500 and on the NAT-T port 4500 (RFC 7296 §2.23: a peer behind a NAT, or
    one that always encapsulates, floats there after IKE_SA_INIT). Port 4500 is the outer plane's UDP
    socket when it has one (ESP in UDP shares it); with NFQUEUE it is a socket of its own for IKE, while
    ESP in UDP to it is queued with the rest of the inbound ESP. The MODP key-pair worker process, if
    any group needs one, starts now, before a privilege drop, and becomes ``user`` itself
    (runtime/kepool.py).
    """
    if not cfg.connections:
        return None
    from ipsecstack.runtime.ike import IkeEndpoint

    encap = node.outer if hasattr(node.outer, "send_ike") else None
    if encap is None:
        from backends.udp import UdpEncapPort

        encap = UdpEncapPort(local_address(cfg), cfg.agent.encap_port)
        node.on_stop.append(encap.close)
        node.side_ports.append(encap)
    force_encap(cfg)
    ike = IkeEndpoint(node, cfg.connections, cfg.start, encap=encap, log=log or node.log, traps=node.traps,
                      acquire_names=cfg.trap)  # fmt: skip
    node.on_start.append(ike.start)
    node.on_stop.append(ike.close)
    ike.keypairs.launch(user)
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
        from backends.nfqueue import LocalInjector, NfqueueTransport, link_mtu

        nfq = NfqueueTransport.from_config(cfg, dp)
        node = Node(dp, queue_out=nfq.out_port, queue_in=nfq.in_port, batch_size=a.batch_size, log=log)
        node.traps = traps
        # RFC 4301 §8: the host's packets grow by the ESP/AH overhead after the kernel chose their size, so
        # oversized ones that may not be fragmented come back to their socket as ICMP with the smaller MTU
        dp.link_mtu = link_mtu
        node.local_out = LocalInjector()
        node.on_stop.append(node.local_out.close)
        if dp.native is not None:
            from ipsecstack.runtime.fastpath_nfq import QueueFastPath

            # the native engine's threads answer the queues; the Node answers what they ask (DESIGN.md §4a)
            node.forwarder = QueueFastPath.for_node(node, offloads=a.offloads)
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
        import asyncio

        from backends.tun_queue import QueueSizer

        sizer = QueueSizer(a.tun_name, budget=a.tun_queue_kb * 1024, log=node.log)
        node.on_start.append(lambda: sizer.start(asyncio.get_running_loop()))
        node.on_stop.append(sizer.stop)
        node.tun_queue = sizer
    if dp.native is not None:
        from ipsecstack.runtime.fastpath import FastPath

        # the native engine's threads carry the packets; the Node answers what they ask (DESIGN.md §4a)
        node.forwarder = FastPath.for_node(node, offloads=a.offloads,
                                           codel_ms=(a.codel_target_ms, a.codel_interval_ms))  # fmt: skip
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


async def drop_privileges(server: Any, account: Account, log: Any) -> None:
    """``[agent] user``: listen on the control socket now, then drop root, before the node reads a packet.

    Everything that needs root is open by then: the ports (``build_node``), IKE's port 500 and the
    MODP key-pair worker process (``attach_ike``), the metrics listener and the control socket
    (``attach_control``, whose start hook then finds it listening). Raises BackendError
    (PrivilegeError) if either step fails: the caller stops, never running on as root when told not to.
    """
    from ipsecstack.runtime import privs

    try:
        await server.start()
    except OSError as e:
        raise BackendError(f"agent.control_socket = {server.path!r}: cannot listen there: {e.strerror}") from None
    privs.preload()  # while the Python installation is still readable whatever its permissions
    privs.drop(account)
    caps = privs.cap_names(privs.capabilities()[0])
    log.info("privileges dropped", user=account.name, uid=account.uid, gid=account.gid, caps=caps)


class Reloader:
    """SIGHUP: re-read the configuration and apply what changed without touching what did not.

    Manual connections that changed are reinstalled; IKE connections that were removed or changed
    are terminated (and their trap policies removed), new or changed ones get trap policies and are
    initiated when ``start_action = start``; unchanged connections keep their SAs. Changes to
    ``[agent]`` (backends, sockets, TUN) need a restart and are reported as such. An invalid file is
    reported and the running configuration stays.
    """

    def __init__(self, path: str, cfg: Config, node: Node, ike: Any, log: Any) -> None:
        self.path = path
        self.cfg = cfg
        self.node = node
        self.ike = ike
        self.log = log

    def __call__(self) -> None:

        from ipsecstack.config import load
        from ipsecstack.errors import ConfigError

        try:
            new = load(self.path, os.environ)
        except Exception as e:  # a broken file, or one the (dropped) user cannot read: never fatal
            error = str(e) if isinstance(e, OSError | ConfigError) else f"{type(e).__name__}: {e}"
            hint = {}
            user = self.cfg.agent.user
            if user and (isinstance(e, PermissionError) or "Permission denied" in error):
                hint["hint"] = (
                    f"the daemon runs as {user!r} (agent.user): make the configuration and its key/secret "
                    "files readable by that user, or restart the daemon to apply changes"
                )
            self.log.error("reload failed; keeping the running configuration", error=error, **hint)
            return
        self.apply(new)

    def apply(self, new: Config) -> dict[str, list[str]]:
        from ipsecstack.config import manual_policies, manual_sas
        from ipsecstack.ike.install import trap_policies

        old, dp, now = self.cfg, self.node.datapath, time.monotonic()
        force_encap(new, old.agent)  # as attach_ike did: the running outer plane decides
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        if new.agent != old.agent:
            self.log.warning("[agent] changed: restart the daemon to apply it (the rest is reloaded)")
        # manual connections
        old_m, new_m = {c.name: c for c in old.manual}, {c.name: c for c in new.manual}
        for name, c in old_m.items():
            if new_m.get(name) != c:
                for sa in [s for s in dp.sad if s.name == name and s.reqid is None]:
                    dp.remove(sa)
                for pol in [p for p in dp.spd if p.name == name]:
                    dp.spd.remove(pol)
        for name, c in new_m.items():
            if old_m.get(name) != c:
                for sa in manual_sas(c):
                    dp.install(sa, now)
                for pol in manual_policies(c):
                    dp.spd.add(pol)
        # IKE connections
        old_p, new_p = {p.name: p for p in old.connections}, {p.name: p for p in new.connections}
        for name in sorted(set(old_m) | set(new_m) | set(old_p) | set(new_p)):
            before, after = old_m.get(name) or old_p.get(name), new_m.get(name) or new_p.get(name)
            key = (
                "added"
                if before is None
                else "removed"
                if after is None
                else "unchanged"
                if before == after
                else "changed"
            )
            report[key].append(name)
        if self.ike is not None:
            traps = self.node.traps
            for name, peer in old_p.items():
                if new_p.get(name) == peer:
                    continue
                self.ike.terminate(name)
                for child in peer.children:
                    reqid = traps.pop((name, child.name), None)
                    for pol in [p for p in dp.spd if p.template is not None and p.template.reqid == reqid]:
                        dp.spd.remove(pol)
            self.ike.manager.peers = dict(new_p)
            self.ike.start_names = list(new.start)
            self.ike.acquire_names = set(new.trap)
            for name, peer in new_p.items():
                if old_p.get(name) == peer:
                    continue
                if peer.remote_addr is not None:
                    for child in peer.children:
                        reqid = max(traps.values(), default=TRAP_REQID_BASE - 1) + 1
                        traps[(name, child.name)] = reqid
                        for pol in trap_policies(name, peer.local_addr, peer.remote_addr, child, reqid):
                            dp.spd.add(pol)
                if name in new.start:
                    self.ike.initiate(name)
            self.ike.set_traps(traps)
        self.cfg = new
        self.log.info("configuration reloaded", **{k: v for k, v in report.items() if v})
        return report
