"""Transport mode over NFQUEUE on the native engine's threads: they answer the queues, Python what they ask.

Theory of operation
-------------------
With ``inner_backend = "nfqueue"`` and the native datapath, the queues stay bound by
:class:`~backends.nfqueue.NfqueuePort` (NetfilterQueue, the firewall rules, the errors a user sees), but
their netlink sockets are handed to the engine (``Engine.nfq_start``): one thread per queue reads the
packets, raises the copy range to 64 KiB, and gives most verdicts itself, with the GIL released
(out queue: flow cache -> transport-mode ESP -> ACCEPT with the ESP packet and the protected packets'
mark, ``backends/esp_routes.py``; in queue: ESP -> unprotect -> inbound flow cache -> ACCEPT with the
plaintext, a round's in-order TCP segments of a flow as one packet with ``[agent] offloads``), the way
the kernel's xfrm carries what strongSwan's charon negotiated. Python stays the
control plane and the source of truth and sees, through the engine's bounded punt queue and its
eventfd, only what the threads cannot decide alone. Each such packet waits in the kernel until this
module's ``Engine.nfq_verdict`` names it:

- ``("qout", queue, id, pkt)``: plaintext whose flow has no cached decision (or whose protected form
  would exceed the path MTU and may not be fragmented). ``Datapath.outbound`` runs as in the Python
  path (SPD, acquire, Python-only SAs, the ICMP of RFC 4301 §8), the verdict goes out, and only then
  the flow's decision (``Datapath.decide_out``) and the path MTU towards the peer are taught to the
  engine (``learn_out``), so the flow's packets stay in order.
- ``("qin", queue, id, spi, inner)``: ESP the engine decrypted and charged, whose flow it does not yet
  know to be allowed: ``Datapath.inbound_decrypted`` runs the RFC 4301 §5.2 check; the plaintext is
  accepted and its flow taught (``learn_in``), or the packet is dropped.
- ``("qseg", pkt)``: a segment of a TCP super-packet from the TCP queue (the engine cut it; the
  super-packet itself was dropped) whose flow has no cached decision: ``Datapath.outbound`` runs as for
  "qout", and what it gives leaves by the engine's raw socket (``Engine.nfq_send``); the flow is taught.
- ``("in", spi, inner)`` and ``("outer", pkt)``: with raw ESP sockets and an inject TUN
  (``nfq_start(esp4=, esp6=, inject=)``, ``backends/nfq_engine_io.py``) the peers' ESP reaches the
  engine's inbound thread without a queue; these are its punts, as in tunnel mode
  (``runtime/fastpath.py``): the §5.2 check on decrypted plaintext (then ``learn_in``), and ESP the
  engine does not hold, for ``Datapath.inbound``. What Python accepts is written into the inject TUN.
- ``("qouter", queue, id, pkt)``: what the engine does not handle (AH, ESP of a Python SA or an unknown
  SPI, IKE on the encapsulation port, plaintext that should have been protected): ``Datapath.inbound``
  sorts it exactly as without the engine; IKE goes to the Node's IKE handler and the packet is dropped.

Every SPD or SAD change flushes both flow caches (``Datapath.on_change``). Lifetime events from the
engine's threads wake the same eventfd. A wake-up handles at most ``ROUNDS`` x ``batch`` punts and
re-schedules itself when more wait, so the loop (IKE, control socket) is never starved; the engine drops
and counts what does not fit its queue (verdict DROP), so no packet waits in the kernel without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ipsecstack.datapath import DISCARD_FLOW, Datapath
from ipsecstack.runtime.fastpath import Buffer, PuntEngine, PuntLoop

if TYPE_CHECKING:
    from ipsecstack.runtime.node import Node

MAX_ENCAP_PORTS = 8  # what the engine takes (fwd.h IPS_NFQ_ENCAP)
MTU_CACHE = 4096  # path MTUs remembered by destination, then forgotten at once


class QueuePort(Protocol):
    """A bound queue the engine's threads read (``backends/nfqueue.py``'s NfqueuePort)."""

    @property
    def fd(self) -> int: ...

    @property
    def queue_num(self) -> int: ...

    @property
    def mark(self) -> int | None: ...


class QueueForwarder(PuntEngine, Protocol):
    """The C NFQUEUE threads' methods (native/fwd_nfq.c, pynfq.c)."""

    def nfq_start(self, queues: Sequence[tuple[str, int, int, int | None]], *, batch: int = ...,
                  encap_ports: Sequence[int] = ..., coalesce: bool = ..., raw4: int | None = ...,
                  raw6: int | None = ..., esp4: int | None = ..., esp6: int | None = ...,
                  inject: int | None = ...) -> int: ...  # fmt: skip

    def nfq_verdict(self, queue_num: int, packet_id: int, payload: Buffer | None, mark: int | None = None) -> bool: ...

    def nfq_send(self, packet: Buffer) -> bool: ...

    def learn_out(self, pkt: Buffer, spi: int | None, *, mtu: int = ...) -> None: ...

    def learn_in(self, spi: int, inner: Buffer) -> None: ...


class InjectPort(Protocol):
    """Where decrypted packets enter the host's stack (``backends/tun.py``'s TunPort)."""

    def fileno(self) -> int: ...

    def write_batch(self, packets: Sequence[bytes]) -> int: ...


class QueueFastPath(PuntLoop):
    """Starts the engine's NFQUEUE threads on a Node's two queues and answers their punts (module docstring)."""

    def __init__(self, node: Node, engine: QueueForwarder, out_port: QueuePort, in_port: QueuePort,
                 *, coalesce: bool = True, tcp_port: QueuePort | None = None,
                 raw_fds: Mapping[int, int] | None = None, esp_fds: Mapping[int, int] | None = None,
                 inject: InjectPort | None = None) -> None:  # fmt: skip
        super().__init__(node, engine, ("qout", "qin", "qouter", "qseg", "in", "outer"))
        if bool(esp_fds) != (inject is not None):
            raise ValueError("esp_fds and inject go together: the ESP read from raw sockets is decrypted into it")
        self.engine = engine
        self.coalesce = coalesce
        self.out_port = out_port
        self.in_port = in_port
        self.tcp_port = tcp_port
        self.raw_fds = dict(raw_fds or {})
        self.esp_fds = dict(esp_fds or {})
        self.inject = inject
        self.send_errors = 0
        self.verdict_errors = 0
        self._mtus: dict[bytes, int] = {}

    def _start_engine(self) -> int:
        out, inn, tcp = self.out_port, self.in_port, self.tcp_port
        queues = [("out", out.fd, out.queue_num, out.mark), ("in", inn.fd, inn.queue_num, None)]
        if tcp is not None:
            queues.append(("tcp", tcp.fd, tcp.queue_num, tcp.mark))
        return self.engine.nfq_start(
            queues,
            batch=min(self.node.batch_size, 256),
            encap_ports=sorted(self.node.datapath.encap_ports)[:MAX_ENCAP_PORTS],
            coalesce=self.coalesce,
            raw4=self.raw_fds.get(4),
            raw6=self.raw_fds.get(6),
            esp4=self.esp_fds.get(4),
            esp6=self.esp_fds.get(6),
            inject=self.inject.fileno() if self.inject is not None else None,
        )

    def stats(self) -> dict[str, object]:
        out = super().stats()
        out["verdict_errors"] = self.verdict_errors
        out["send_errors"] = self.send_errors
        return out

    def answer(self, punts: Sequence[tuple[Any, ...]]) -> None:
        """One verdict per punt, in order: the Python datapath's answer, then what the engine may learn from it."""
        node = self.node
        dp: Datapath = node.datapath
        now = node.clock()
        for p in punts:
            kind = p[0]
            if kind == "qout":
                self._out(dp, p[1], p[2], p[3], now)
            elif kind == "qin":
                self._in(dp, p[1], p[2], p[3], p[4], now)
            elif kind == "qouter":
                self._outer(dp, p[1], p[2], p[3], now)
            elif kind == "qseg":
                self._segment(dp, p[1], now)
            elif kind == "in":
                self._raw_in(dp, p[1], p[2], now)
            elif kind == "outer":
                self._raw_outer(dp, p[1], now)
            else:
                continue  # an outbound TUN-mode punt cannot come from these threads
            self.punts[kind] += 1

    def _verdict(self, queue: int, packet_id: int, payload: bytes | None, mark: int | None = None) -> None:
        if not self.engine.nfq_verdict(queue, packet_id, payload, mark):
            self.verdict_errors += 1  # counted by the engine too (fwd_stats nfq.tx_errors)

    def _out(self, dp: Datapath, queue: int, packet_id: int, pkt: bytes, now: float) -> None:
        res = dp.outbound([pkt], now)
        rep = res.to_network[0] if res.to_network else None
        # a replacement is routed by the protected packets' table; a packet let through as it is is not
        self._verdict(queue, packet_id, rep, self.out_port.mark if rep is not None and rep is not pkt else None)
        self.node._after(res, "out")
        self._teach_out(dp, pkt)

    def _segment(self, dp: Datapath, pkt: bytes, now: float) -> None:
        res = dp.outbound([pkt], now)
        for rep in res.to_network[:1]:
            if not self.engine.nfq_send(rep):
                self.send_errors += 1  # counted by the engine too (fwd_stats tx_errors raw4/raw6)
        self.node._after(res, "out")
        self._teach_out(dp, pkt)

    def _teach_out(self, dp: Datapath, pkt: bytes) -> None:
        """After the packet's answer went out: its flow's decision and path MTU, for the engine's cache."""
        spi = dp.decide_out(pkt)
        if spi is not None:
            self.engine.learn_out(pkt, None if spi == DISCARD_FLOW else spi, mtu=self._mtu(dp, pkt))

    def _in(self, dp: Datapath, queue: int, packet_id: int, spi: int, inner: bytes, now: float) -> None:
        res, ok = dp.inbound_decrypted([(spi, inner)], now)
        self._verdict(queue, packet_id, inner if ok else None)
        self.node._after(res, "in")
        if ok:
            self.engine.learn_in(spi, inner)

    def _outer(self, dp: Datapath, queue: int, packet_id: int, pkt: bytes, now: float) -> None:
        res = dp.inbound([pkt], now)
        self._verdict(queue, packet_id, res.to_inner[0] if res.to_inner else None)
        self.node._after(res, "in")  # IKE on the encapsulation port reaches node.on_ike here

    def _raw_in(self, dp: Datapath, spi: int, inner: bytes, now: float) -> None:
        res, ok = dp.inbound_decrypted([(spi, inner)], now)
        self._inject(res.to_inner)
        self.node._after(res, "in")
        if ok:
            self.engine.learn_in(spi, inner)

    def _raw_outer(self, dp: Datapath, pkt: bytes, now: float) -> None:
        res = dp.inbound([pkt], now)
        self._inject(res.to_inner)
        self.node._after(res, "in")

    def _inject(self, pkts: Sequence[bytes]) -> None:
        if pkts and self.inject is not None:
            self.inject.write_batch(pkts)  # what the kernel refuses is counted in the port's stats

    def _mtu(self, dp: Datapath, pkt: bytes) -> int:
        """The link MTU towards pkt's destination (transport mode: the peer), 0 when the datapath has none."""
        link_mtu: Callable[[str], int] | None = dp.link_mtu
        if link_mtu is None:
            return 0
        dst = pkt[16:20] if pkt[0] >> 4 == 4 else pkt[24:40]
        mtu = self._mtus.get(dst)
        if mtu is None:
            import ipaddress

            if len(self._mtus) >= MTU_CACHE:
                self._mtus.clear()
            mtu = self._mtus[dst] = max(0, min(link_mtu(str(ipaddress.ip_address(dst))), 1 << 20))
        return mtu
