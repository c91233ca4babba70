"""Hand a built node's hot descriptors to the native engine's threads, when its planes are ones they drive.

The runtime's :class:`~ipsecstack.runtime.fastpath.FastPath` and
:class:`~ipsecstack.runtime.fastpath_nfq.QueueFastPath` take file descriptors and answer punts; which
backend a descriptor belongs to, and whether the engine can read it, is decided here, above both the
backends and the runtime (DESIGN.md §4a). A plane the engine cannot drive (a memory pipe, AH-only raw
sockets) gives None, and the Node reads it as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends.nfq_engine_io import EngineIO
from backends.nfqueue import NfqueuePort
from backends.outer import OuterSet
from backends.rawsock import RawPort
from backends.tun import TunPort
from backends.udp import UdpEncapPort
from ipsecstack.runtime.fastpath import PROTO_ESP, FastPath
from ipsecstack.runtime.fastpath_nfq import QueueFastPath
from ipsecstack.runtime.node import Node


def outer_fds(outer: object) -> tuple[list[tuple[str, int]], list[RawPort]] | None:
    """The engine's share of an outer plane: ``(kind, fd)`` pairs, and the raw ports whose AH stays in Python.

    None when the plane is not one the engine can drive.
    """
    fds: list[tuple[str, int]] = []
    python_raw: list[RawPort] = []
    parts: Sequence[object] = (outer.udp, outer.raw) if isinstance(outer, OuterSet) else (outer,)
    for part in parts:
        if isinstance(part, UdpEncapPort):
            fds.append((f"udp{part.version}", part.fileno()))
        elif isinstance(part, RawPort):
            esp = [fd for proto, fd in part.receive_fds() if proto == PROTO_ESP]
            if not esp:
                return None
            fds.append((f"esp{part.version}", esp[0]))
            fds.append((f"raw{part.version}", part.send_fd()))
            if any(proto != PROTO_ESP for proto, _fd in part.receive_fds()):
                python_raw.append(part)
        else:
            return None
    return fds, python_raw


def tun_forwarder(node: Node, *, offloads: bool = True,
                  codel_ms: tuple[float, float] = (0.0, 100.0)) -> FastPath | None:  # fmt: skip
    """A FastPath when the node runs the native datapath between a TUN device and raw/UDP sockets.

    ``offloads``: TSO and coalescing where the TUN device has the virtio header, UDP GSO/GRO on the
    ESP-in-UDP socket (``[agent] offloads``). ``codel_ms``: CoDel's target and interval on the ESP
    receive sockets (``[agent] codel_target_ms``, ``codel_interval_ms``; target 0: off).
    """
    dp = node.datapath
    if dp.native is None or not isinstance(node.inner, TunPort) or node.outer is None:
        return None
    got = outer_fds(node.outer)
    if got is None:
        return None
    fds, python_raw = got
    return FastPath(node, dp.native.engine, node.inner.fileno(), fds, python_raw,
                    tso=offloads and node.inner.vnet_hdr, udp_offloads=offloads, codel_ms=codel_ms)  # fmt: skip


def queue_forwarder(node: Node, *, offloads: bool = True, tcp: NfqueuePort | None = None,
                    io: EngineIO | None = None) -> QueueFastPath | None:  # fmt: skip
    """A QueueFastPath when the node runs the native datapath on two bound NFQUEUE ports.

    ``offloads`` (``[agent] offloads``): the in queue's in-order TCP segments of a round are accepted
    as one packet, as GRO would have merged them. ``tcp``: the TCP queue (whole super-packets), whose
    ESP packets leave by ``io``'s raw sockets; ``io`` also gives the raw ESP sockets the peers' ESP is
    read from and the TUN the plaintext is written into (``backends/nfq_engine_io.py``).
    """
    dp = node.datapath
    out, inn = node.queue_out, node.queue_in
    if dp.native is None or not isinstance(out, NfqueuePort) or not isinstance(inn, NfqueuePort):
        return None
    return QueueFastPath(node, dp.native.engine, out, inn, coalesce=offloads, tcp_port=tcp,
                         raw_fds=io.send_fds() if io else None, esp_fds=io.esp_fds() if io else None,
                         inject=io.inject if io else None)  # fmt: skip
