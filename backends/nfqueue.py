"""Transport mode on the host's own traffic through NFQUEUE (DESIGN.md §3: inner and outer plane in one).

Theory of operation
-------------------
The kernel keeps routing and sending the host's packets; netfilter hands the ones the SPD protects
to this process and takes back a replacement:

- **outbound queue** (``agent.nfqueue_out``, filter ``OUTPUT`` -> chain ``IPSECSTACK-OUT``): plaintext
  packets matching an SPD-O PROTECT selector are queued; the node runs ``Datapath.outbound`` and the
  packet is accepted with its protected form (ESP/AH, transport mode) as the new payload.
- **inbound queue** (``agent.nfqueue_in``, filter ``INPUT`` -> chain ``IPSECSTACK-IN``): ESP (protocol
  50), AH (51) and, where a connection uses encapsulation, UDP to the encapsulation port, from the
  peer to the local address, are queued and replaced by the plaintext ``Datapath.inbound`` returns;
  what the datapath refuses is dropped. Plaintext that matches an SPD-I PROTECT selector but arrived
  unprotected is queued too, after those rules: the datapath drops and counts it (RFC 4301 §5.2).

The rules are generated from the SPD in policy order (BYPASS -> ``RETURN``, DISCARD -> ``DROP``,
PROTECT -> ``NFQUEUE``), behind rules that return ESP/AH (and our ESP-in-UDP) at the top of
``IPSECSTACK-OUT`` so protected packets are never queued twice, and ICMPv6 neighbour discovery for
IPv6 so the link keeps working. A queued packet that is accepted continues at the next netfilter hook,
not at the next rule: firewall rules after ours in ``OUTPUT``/``INPUT`` of the filter table do not see
it. Chains are created complete and only then jumped to (inserted first in ``OUTPUT``/``INPUT``); on
``close()`` exactly those jumps and chains are removed. Chains found already present at start are the
leftovers of a run that did not stop cleanly (``kill -9``, a crash): they are logged and removed
before the new rules are installed. The queues are bound *before* that, so a second agent on the same
queue numbers fails with a clear error instead of tearing down the rules of a running one.
Limitation: a selector with ports does not match non-first IPv4/IPv6 fragments in iptables, so such
fragments of unprotected plaintext are not refused in the kernel (selectors without ports, the
transport-mode default, match every fragment).

Path MTU (RFC 4301 §8): the datapath is given the link MTU towards each peer; a protected packet that
would exceed it is fragmented by the kernel when the host's packet had DF clear, or refused with an
ICMP error carrying the MTU less the overhead, which :class:`LocalInjector` hands to this host's stack
(the sending socket learns it). Replacements carry a firewall mark that routes them by a table of their
own (:mod:`backends.esp_routes`), so that MTU does not shrink the protected packets' route as well.

Fail closed
-----------
By default the NFQUEUE rules have no ``--queue-bypass``: while the rules are in place and no process
listens on the queue (agent crashed, killed, hung with a full queue), protected traffic is *dropped*,
never sent in clear. ``queue_bypass = true`` in ``[agent]`` adds ``--queue-bypass`` (fail open: with no
listener the kernel lets the plaintext through, both ways), for hosts where availability beats
confidentiality.
A clean stop (SIGTERM) first unbinds the queues (in-flight packets are dropped), then removes the
rules: from then on the host sends what it sends with no IPsec policy at all, as after
``ip xfrm policy flush``; a peer that still runs drops that plaintext (its inbound queue rule).

Batching
--------
``attach`` registers the queue's netlink socket with ``loop.add_reader``. ``read_batch(limit)`` reads
the socket without blocking until it is empty or ``limit`` packets are held (NetfilterQueue >= 1.0
lets a packet outlive its callback: we copy the payload and keep the ``Packet`` for its verdict);
``verdicts`` then sets each verdict after the datapath ran. Every held packet gets a verdict: one
without a replacement is dropped. Per-packet problems are counted, never raised.

MTU
---
The kernel sizes the host's packets for the link; the replacement is bigger by the SA's overhead and a
packet that no longer fits the path MTU (DF set) is lost silently. With ``mss_clamp = true`` (the
default) a ``TCPMSS --set-mss`` rule in the mangle table (chain ``IPSECSTACK-MSS`` from ``OUTPUT``)
clamps the MSS of TCP SYNs (ours and our SYN-ACKs) to the protected peers to
``link MTU - IP header - 20 - worst-case SA overhead``, so both ends send segments whose protected form
fits. NetfilterQueue does not ask for GSO packets (``NFQA_CFG_F_GSO``), so the kernel segments before
queueing and each queued packet is one wire-sized packet. The exception is the native engine's TCP
queue (``queue_tcp``, ``agent.nfqueue_tcp``, planned by ``ipsecstack/agent/nfq_rules.py`` when the native
engine runs with offloads): the engine sets ``NFQA_CFG_F_GSO`` on it, takes whole TCP super-packets,
and sends their protected segments on the IPPROTO_RAW sockets of ``engine_io``
(:mod:`backends.nfq_engine_io`, with ``MARK``, which the first rule of ``IPSECSTACK-OUT`` returns). In
the same mode the peers' ESP is not queued: the engine reads it from ``engine_io``'s raw ESP sockets and
writes the plaintext into its inject TUN (that module says how). ``close_engine_io`` closes all of it
once the engine has stopped. NetfilterQueue copies at most 4016 bytes of a
packet: longer ones (jumbo frames) are dropped and counted, and the clamp never allows more. Non-TCP
datagrams within the overhead of the MTU are not covered (IPv4 without DF gets fragmented by the kernel
after the replacement). A lower-MTU route is no substitute: its MTU applies to the replaced packet too
(checked: with a 1400-byte route MTU to the peer and no clamp, a TCP transfer stalls all the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog

from backends.esp_routes import MARK, EspRoutes
from backends.nfq_engine_io import EngineIO, inject_name
from ipsecstack.runtime.io import BackendError, PortStats, QueuedPacket

CHAIN_OUT = "IPSECSTACK-OUT"
CHAIN_IN = "IPSECSTACK-IN"
CHAIN_MSS = "IPSECSTACK-MSS"
# (table, our chain, the built-in chain that jumps to it)
CHAINS: tuple[tuple[str, str, str], ...] = (
    ("filter", CHAIN_OUT, "OUTPUT"),
    ("filter", CHAIN_IN, "INPUT"),
    ("mangle", CHAIN_MSS, "OUTPUT"),
)
TOOLS = {4: "iptables", 6: "ip6tables"}
QUEUE_MAXLEN = 4096
SOL_NETLINK = 270  # Linux <linux/socket.h>; not every Python names these
NETLINK_NO_ENOBUFS = 5  # <linux/netlink.h>
SO_RCVBUFFORCE = 33
NETLINK_RCVBUF = 8 << 20
MAX_COPY = 4096 - 80  # NetfilterQueue's copy range: its 4 KiB receive buffer less the netlink metadata
IPTABLES_TIMEOUT = 20.0
MAX_JUMP_DELETES = 64
DEFAULT_LINK_MTU = 1500

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_tool(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT, check=False)


@dataclass(frozen=True)
class Rule:
    """One ``-A chain ...`` rule for one address family (planned from the SPD by ``ipsecstack/agent/nfq_rules.py``)."""

    family: int
    table: str
    chain: str
    args: tuple[str, ...]


# --- the queue ports -----------------------------------------------------------------------------


class _Held:
    """A queued packet kept past its callback: the payload copy and the handle for the verdict."""

    __slots__ = ("packet", "payload")

    def __init__(self, packet: Any, payload: bytes) -> None:
        self.packet = packet
        self.payload = payload


class _BatchReader:
    """What ``NetfilterQueue.run_socket`` reads from: non-blocking, and "empty" once the batch is full."""

    __slots__ = ("fd", "held", "limit")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: list[QueuedPacket] = []
        self.limit = 0

    def recv(self, size: int) -> bytes:
        if len(self.held) >= self.limit:
            raise BlockingIOError(errno.EAGAIN, "batch full")
        return os.read(self.fd, size)


class NfqueuePort:
    """One bound NFQUEUE number as a :class:`~ipsecstack.runtime.io.QueuePort`."""

    def __init__(self, name: str, queue_num: int, on_close: Callable[[NfqueuePort], None], log: Any) -> None:
        from netfilterqueue import NetfilterQueue

        self.name = name
        self.queue_num = queue_num
        self.stats = PortStats()
        self.verdict_errors = 0
        self.mark: int | None = None  # set on the replacements this port's verdicts give (outbound queue)
        self._log = log
        self._on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        try:
            self._nfq: Any = NetfilterQueue()
        except OSError as e:
            raise BackendError(
                f"cannot open an NFQUEUE netlink socket ({e}): this needs root (CAP_NET_ADMIN) and the kernel's "
                "nfnetlink_queue module (modprobe nfnetlink_queue)"
            ) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # receive buffer smaller than asked: still works
                self._nfq.bind(queue_num, self._on_packet, max_len=QUEUE_MAXLEN)
        except OSError:
            self._nfq = None
            raise BackendError(
                f"NFQUEUE {queue_num} is already bound by another process (another ipsecstack agent?): stop it, "
                "or choose other numbers with agent.nfqueue_out / agent.nfqueue_in"
            ) from None
        self._fd: int = self._nfq.get_fd()
        os.set_blocking(self._fd, False)
        self._no_enobufs()
        self._reader = _BatchReader(self._fd)

    def _no_enobufs(self) -> None:
        """Overflow of the netlink socket must not become a socket error.

        When packets arrive faster than we read them, the kernel drops what does not fit into the
        netlink socket's receive buffer (counted in /proc/net/netfilter/nfnetlink_queue, user_dropped)
        and, by default, also sets an ENOBUFS error on the socket. That error shows as POLLERR, and
        libuv (uvloop) stops polling a descriptor that reports POLLERR for good: the agent never read
        the queue again, the queue filled, and with fail-closed rules every protected packet was
        dropped from then on (a UDP flood followed by a stall of all traffic). NETLINK_NO_ENOBUFS keeps
        the drops and drops the error; a larger buffer makes them rarer.
        """

        s = socket.socket(fileno=os.dup(self._fd))
        try:
            with contextlib.suppress(OSError):
                s.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, NETLINK_RCVBUF)
            except OSError:  # capped by net.core.rmem_max without CAP_NET_ADMIN
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NETLINK_RCVBUF)
        finally:
            s.close()  # only the duplicate: the options belong to the socket, not the descriptor

    def _on_packet(self, pkt: Any) -> None:
        try:
            payload = pkt.get_payload()
            # NetfilterQueue copies at most MAX_COPY bytes: a longer packet arrives cut short. Never process
            # (or let through) a partial packet.
            if len(payload) < 20 or len(payload) < (
                40 + int.from_bytes(payload[4:6], "big")
                if payload[0] >> 4 == 6
                else int.from_bytes(payload[2:4], "big")
            ):
                raise ValueError("truncated")
            self._reader.held.append(_Held(pkt, payload))
        except Exception:  # a packet we cannot read in full cannot be processed: never let it through
            self.stats.rx_errors += 1
            with contextlib.suppress(Exception):
                pkt.drop()

    # QueuePort ------------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The queue's netlink socket: the native engine's threads read it instead of :meth:`read_batch`."""
        return self._fd

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        if self._closed:
            return
        self._loop = loop
        loop.add_reader(self._fd, on_readable)

    def read_batch(self, limit: int) -> list[QueuedPacket]:
        if self._closed:
            return []
        reader = self._reader
        reader.limit = limit
        try:
            self._nfq.run_socket(reader)
        except OSError as e:
            n = self.stats.rx_errors = self.stats.rx_errors + 1
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th... error: the log is never flooded
                self._log.warning("nfqueue receive failed", queue=self.queue_num, error=str(e), errors=n)
        held, reader.held = reader.held, []
        self.stats.rx_packets += len(held)
        self.stats.rx_bytes += sum(len(h.payload) for h in held)
        return held

    def verdicts(self, packets: Sequence[QueuedPacket], replacements: Sequence[bytes | None]) -> None:
        stats = self.stats
        n = len(replacements)
        for i, qp in enumerate(packets):
            rep = replacements[i] if i < n else None
            try:
                pkt = cast(_Held, qp).packet
                if rep is None:
                    pkt.drop()
                    stats.tx_dropped += 1
                    continue
                if rep is not qp.payload:
                    pkt.set_payload(rep if type(rep) is bytes else bytes(rep))
                    if self.mark is not None:
                        pkt.set_mark(self.mark)  # routed by the protected packets' table (esp_routes.py)
                pkt.accept()
                stats.tx_packets += 1
                stats.tx_bytes += len(rep)
            except Exception:  # verdict already given, queue gone, bad replacement type: count, go on
                self.verdict_errors += 1
                stats.tx_dropped += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        if self._nfq is not None:
            with contextlib.suppress(Exception):
                self._nfq.unbind()  # the kernel drops what is still queued: fail closed
            self._nfq = None  # the netlink socket is closed when the object goes
        self._on_close(self)


# --- the transport: queues + rules ---------------------------------------------------------------


def link_mtu(addr: str, runner: Runner = run_tool) -> int:
    """MTU towards ``addr``: the route's ``mtu`` if it has one, else the outgoing device's."""
    try:
        res = runner(["ip", "-o", "route", "get", addr])
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_LINK_MTU
    if res.returncode != 0:
        return DEFAULT_LINK_MTU
    m = re.search(r"\bmtu (?:lock )?(\d+)", res.stdout)
    if m:
        return int(m.group(1))
    dev = re.search(r"\bdev (\S+)", res.stdout)
    if dev:
        with contextlib.suppress(OSError, ValueError), open(f"/sys/class/net/{dev.group(1)}/mtu") as f:
            return int(f.read().strip())
    return DEFAULT_LINK_MTU


class LocalInjector:
    """Packets for this host's own sockets (ICMP errors from the datapath: path MTU, RFC 4301 §8), sent to it
    through IPPROTO_RAW sockets, so the kernel takes them in as any received packet (the sender's socket
    learns the smaller path MTU). Write-only; a packet the kernel refuses is dropped and counted."""

    name = "local"
    mtu = DEFAULT_LINK_MTU

    def __init__(self) -> None:

        self.stats = PortStats()
        self._socks: dict[int, Any] = {}
        for version, af in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                s = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError:
                continue  # no IPv6 here, or not permitted: those errors are dropped and counted
            s.setblocking(False)
            self._socks[version] = s

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        pass  # write-only

    def read_batch(self, limit: int) -> list[bytes]:
        return []

    def write_batch(self, packets: Sequence[bytes]) -> int:
        sent = 0
        for pkt in packets:
            try:
                version = pkt[0] >> 4
                dst = str(ipaddress.ip_address(pkt[16:20] if version == 4 else pkt[24:40]))
                self._socks[version].sendto(pkt, (dst, 0))
            except (OSError, KeyError, ValueError, IndexError):
                self.stats.tx_dropped += 1
                continue
            sent += 1
        self.stats.tx_packets += sent
        return sent

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()


class NfqueueTransport:
    """Both queues of a transport-mode host and the firewall rules that feed them (planned from the SPD
    by the composition root: ``ipsecstack/agent/nfq_rules.py``)."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        queue_out: int = 10,
        queue_in: int = 11,
        queue_tcp: int | None = None,
        bypass: bool = False,
        log: Any = None,
        runner: Runner = run_tool,
    ) -> None:
        self.log = log or structlog.get_logger("ipsecstack").bind(backend="nfqueue")
        self._run = runner
        self._installed: list[tuple[int, str, str, str]] = []  # (family, table, chain, parent)
        self._open_ports = 0
        self._closed = False
        if queue_out == queue_in:
            raise BackendError(f"agent.nfqueue_out and agent.nfqueue_in are both {queue_out}: give two numbers")
        if queue_tcp is not None and queue_tcp in (queue_out, queue_in):
            raise BackendError(
                f"agent.nfqueue_tcp is {queue_tcp}, as agent.nfqueue_{'out' if queue_tcp == queue_out else 'in'}: "
                "give three different numbers"
            )
        self.tcp_port: NfqueuePort | None = None
        self.engine_io: EngineIO | None = None
        _preflight()
        self.rules = list(rules)
        for fam in sorted({r.family for r in self.rules}):
            if shutil.which(TOOLS[fam]) is None:
                raise BackendError(
                    f"{TOOLS[fam]} not found: the nfqueue backend installs firewall rules with it "
                    "(apt-get install iptables)"
                )
        self.out_port = NfqueuePort("nfqueue-out", queue_out, self._port_closed, self.log)
        try:
            self.in_port = NfqueuePort("nfqueue-in", queue_in, self._port_closed, self.log)
        except BaseException:
            self.out_port.close()
            raise
        self._open_ports = 2
        if queue_tcp is not None:
            try:
                self.tcp_port = NfqueuePort("nfqueue-tcp", queue_tcp, self._port_closed, self.log)
                self._open_ports += 1
                self.engine_io = EngineIO({r.family for r in self.rules}, inject_name(queue_in))
            except BaseException:
                self.close()
                raise
            self.tcp_port.mark = MARK
        # RFC 4301 §8: the protected packets get a route (and so a path MTU) apart from the host's own packets
        self.routes = EspRoutes({r.family for r in self.rules}, self._run, self.log)
        self.out_port.mark = MARK
        try:
            self._clean_stale()
            self.routes.install()
            self._install()
        except BaseException:
            self.close()
            raise
        self.log.info(
            "nfqueue rules installed", rules=len(self.rules), queue_out=queue_out, queue_in=queue_in,
            queue_tcp=queue_tcp, fail="open (queue_bypass)" if bypass else "closed",
        )  # fmt: skip

    # --- rules -------------------------------------------------------------------------------------

    def _ipt(self, fam: int, table: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([TOOLS[fam], "-w", "5", "-t", table, *args])

    def _must(self, fam: int, table: str, *args: str) -> None:
        try:
            res = self._ipt(fam, table, *args)
        except (OSError, subprocess.SubprocessError) as e:
            raise BackendError(f"{TOOLS[fam]} -t {table} {' '.join(args)} failed: {e}") from None
        if res.returncode != 0:
            raise BackendError(
                f"{TOOLS[fam]} -t {table} {' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip()}"
            )

    def _chains(self) -> list[tuple[int, str, str, str]]:
        fams = sorted({r.family for r in self.rules})
        used = {(r.family, r.table, r.chain) for r in self.rules}
        return [(f, t, c, p) for f in fams for (t, c, p) in CHAINS if (f, t, c) in used or c != CHAIN_MSS]

    def _exists(self, fam: int, table: str, chain: str) -> bool:
        try:
            return self._ipt(fam, table, "-S", chain).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _remove_chain(self, fam: int, table: str, chain: str, parent: str) -> None:
        for _ in range(MAX_JUMP_DELETES):
            try:
                if self._ipt(fam, table, "-D", parent, "-j", chain).returncode != 0:
                    break
            except (OSError, subprocess.SubprocessError):
                break
        for args in (("-F", chain), ("-X", chain)):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._ipt(fam, table, *args)

    def _clean_stale(self) -> None:
        for fam in (4, 6):
            if shutil.which(TOOLS[fam]) is None:
                continue
            for table, chain, parent in CHAINS:
                if self._exists(fam, table, chain):
                    self.log.warning(
                        "removing stale rules left by an earlier run that did not stop cleanly",
                        tool=TOOLS[fam], table=table, chain=chain,
                    )  # fmt: skip
                    self._remove_chain(fam, table, chain, parent)
                    if self._exists(fam, table, chain):
                        raise BackendError(
                            f"cannot remove the stale chain {chain} ({TOOLS[fam]} -t {table}); remove it by hand: "
                            f"{TOOLS[fam]} -t {table} -D {parent} -j {chain}; {TOOLS[fam]} -t {table} -F {chain}; "
                            f"{TOOLS[fam]} -t {table} -X {chain}"
                        )

    def _install(self) -> None:
        # build each chain completely, then jump to it: traffic never sees a half-built chain
        for fam, table, chain, parent in self._chains():
            self._must(fam, table, "-N", chain)
            self._installed.append((fam, table, chain, parent))
            for r in self.rules:
                if (r.family, r.table, r.chain) == (fam, table, chain):
                    self._must(fam, table, "-A", chain, *r.args)
        for fam, table, chain, parent in self._installed:
            self._must(fam, table, "-I", parent, "1", "-j", chain)

    def remove_rules(self) -> None:
        """Remove exactly the jumps and chains this instance created (idempotent)."""
        while self._installed:
            fam, table, chain, parent = self._installed.pop()
            self._remove_chain(fam, table, chain, parent)

    # --- lifecycle ---------------------------------------------------------------------------------

    def _port_closed(self, port: NfqueuePort) -> None:
        self._open_ports -= 1
        if self._open_ports <= 0:
            self.remove_rules()
            self.routes.remove()
            self.log.info("nfqueue rules removed")

    def close(self) -> None:
        """Unbind both queues (queued packets are dropped), then remove the rules."""
        if self._closed:
            return
        self._closed = True
        self.close_engine_io()
        for port in (getattr(self, "out_port", None), getattr(self, "in_port", None)):
            if port is not None:
                port.close()
        self.remove_rules()
        routes = getattr(self, "routes", None)
        if routes is not None:
            routes.remove()

    def close_engine_io(self) -> None:
        """Unbind the TCP queue, close the raw sockets and remove the inject TUN (after the engine stopped)."""
        port, self.tcp_port = getattr(self, "tcp_port", None), None
        if port is not None:
            port.close()
        io, self.engine_io = getattr(self, "engine_io", None), None
        if io is not None:
            io.close()


def _preflight() -> None:
    if os.geteuid() != 0:
        raise BackendError(
            "the nfqueue backend needs root (CAP_NET_ADMIN) to bind NFQUEUE and install iptables rules: "
            "run ipsecstack as root"
        )
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        raise BackendError(
            "the nfqueue backend needs the NetfilterQueue package: pip install 'ipsecstack[nfqueue]' "
            "(it builds against libnetfilter-queue-dev and libnfnetlink-dev)"
        ) from None
    if shutil.which("iptables") is None:
        raise BackendError(
            "iptables not found: the nfqueue backend installs firewall rules with it (apt-get install iptables)"
        )
