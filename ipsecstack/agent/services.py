"""Services hooked to a built node: the IKE endpoint, the control socket and metrics, the privilege drop.

Theory of operation
-------------------
:func:`ipsecstack.agent.build.build_node` opens the ports and creates the datapath; what runs beside
the packets is attached here, each as a start hook and a stop hook on the node, so ``Node.run`` starts
them in order once the loop is running and closes them in reverse. Everything that needs root (port
500, the metrics listener, the control socket, the MODP worker process) is opened before
:func:`drop_privileges` gives root up.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ipsecstack.agent.build import local_address
from ipsecstack.config import AgentConfig, Config
from ipsecstack.runtime.io import BackendError
from ipsecstack.runtime.node import Node

if TYPE_CHECKING:
    from ipsecstack.runtime.privs import Account


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


def attach_control(cfg: Config, node: Node, ike: Any, *, log: Any = None) -> Any:
    """Serve the control socket while the node runs."""
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
