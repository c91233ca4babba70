"""The inner plane on a Linux TUN device: plaintext IP packets to and from the host's own stack.

Theory of operation
-------------------
``TunPort`` opens ``/dev/net/tun`` non-blocking and binds the descriptor to a new layer-3 device
with ``TUNSETIFF`` (``IFF_TUN | IFF_NO_PI``: every ``read``/``write`` is exactly one IP packet, no
packet-information prefix; ``IFF_TUN_EXCL``: refuse to attach to a device that already exists).
The device lives as long as the descriptor: it is not made persistent, so closing the descriptor
(or the process dying) removes it together with its addresses and routes.

Then, over rtnetlink (pyroute2), the port sets the MTU, brings the link up, adds the configured
addresses (``"10.1.0.1/16"``; IPv6 without duplicate address detection) and routes the given
subnets into the device (``ip route add 10.2.0.0/16 dev ipsec0``). ``close()`` undoes exactly what
was added, in reverse, then closes the descriptor. pyroute2 0.9 runs its netlink socket on an
asyncio loop of its own, which cannot nest in the runtime's running loop (and uvloop cannot open
netlink endpoints), so these few rtnetlink calls run in a short-lived thread that the caller joins.

With ``vnet_hdr=True`` the device is opened with ``IFF_VNET_HDR`` (``TUNSETVNETHDRSZ`` 10) and
``TUNSETOFFLOAD`` (``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``, plus ``TUN_F_USO4 | TUN_F_USO6`` where the
kernel has them, Linux 6.2): the kernel then hands over TCP (UDP) super-packets of up to 64 KB and
unfinished checksums, which the native forwarder cuts and finishes in C (``fwd_start(tso=True)``);
``read_batch`` strips the header and cuts super-packets itself, and ``write_batch`` coalesces runs of
one TCP flow into super-packets (one ``writev`` each) and puts an all-zero header before every other
packet (backends/tun_offload.py), so to every other caller the port still moves plain IP packets, and
the Python datapath gets the offloads too: one read per 64 KB the host sends, one write per run.

The runtime drives it by readiness (DESIGN.md §3-4): ``attach`` registers the descriptor with
``loop.add_reader``; ``read_batch`` calls ``os.read`` until ``EAGAIN`` or ``limit`` packets;
``write_batch`` calls ``os.write`` once per packet (or per coalesced run) and counts whatever the kernel refuses
(``EAGAIN``, ``ENOBUFS``, ``EINVAL`` for a malformed packet, ...) in ``stats.tx_dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from backends import tun_offload
from ipsecstack.runtime.io import BackendError, PortStats

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_TUN_EXCL = 0x8000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
IFNAMSIZ = 16
IFA_F_NODAD = 0x02
READ_SIZE = 65535  # a TUN read returns at most one packet; a bigger buffer never truncates
NETLINK_TIMEOUT = 15.0

T = TypeVar("T")


def _off_loop(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` in a short-lived thread and wait for it.

    pyroute2 (0.9) drives its netlink socket with an asyncio loop of its own: it cannot run inside the
    caller's running loop (and uvloop cannot open netlink endpoints at all), and the port is built
    from inside ``async def main``. A thread without a running loop gives pyroute2 a fresh one.
    """
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:
            box.append((False, e))

    t = threading.Thread(target=run, name=f"tun-netlink-{what}", daemon=True)
    t.start()
    t.join(NETLINK_TIMEOUT)
    if not box:
        raise BackendError(f"TUN: rtnetlink did not answer within {NETLINK_TIMEOUT:.0f}s ({what})")
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _open_tun(name: str, dev_path: str, extra_flags: int = 0) -> int:
    """Open the TUN clone device and create the interface ``name``; BackendError says what is missing."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise BackendError(f"TUN device name {name!r} is not a valid interface name (1-15 characters, no '/')")
    try:
        fd = os.open(dev_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(
            f"{dev_path} does not exist: load the TUN driver (modprobe tun) or, in a container, "
            "pass the device in (--device /dev/net/tun)"
        ) from None
    except PermissionError:
        raise BackendError(f"cannot open {dev_path}: permission denied; run as root or with CAP_NET_ADMIN") from None
    except OSError as e:
        raise BackendError(f"cannot open {dev_path}: {e.strerror}") from None
    ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | extra_flags)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise BackendError(
                f"cannot create TUN device {name!r}: operation not permitted; run as root or grant CAP_NET_ADMIN "
                "(e.g. AmbientCapabilities=CAP_NET_ADMIN in the systemd unit)"
            ) from None
        if e.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
            raise BackendError(
                f"cannot create TUN device {name!r}: the name is in use by another interface or process; "
                f"choose another agent.tun_name (or, if it is a stale device, remove it: ip link del {name})"
            ) from None
        if e.errno == errno.ENOTTY or e.errno == errno.EBADFD:
            raise BackendError(f"{dev_path} is not a TUN clone device (modprobe tun)") from None
        raise BackendError(f"cannot create TUN device {name!r}: {e.strerror}") from None
    return fd


class TunPort:
    """A layer-3 TUN device as a :class:`~ipsecstack.runtime.io.PacketPort` (the inner plane)."""

    def __init__(
        self,
        name: str,
        *,
        mtu: int,
        addresses: Iterable[str] = (),
        routes: Iterable[str] = (),
        dev_path: str = "/dev/net/tun",
        vnet_hdr: bool = False,
        txqueuelen: int | None = None,
        scope: int | None = None,
    ) -> None:
        self.name = name
        self.scope = scope  # the addresses' rtnetlink scope (RT_SCOPE_HOST = 254, ...); None: universe
        self.mtu = mtu
        # the kernel's ring between the stack and our reads, in packets (None: the kernel's 500). The TUN
        # driver orphans what it queues, so TCP's small-queue limit does not apply and a bulk flow fills
        # the ring: with TSO each entry may be a 64 KiB super-packet (bench/README.md "Latency")
        self.txqueuelen = txqueuelen
        self.vnet_hdr = vnet_hdr
        self.offloads = 0  # the TUN_F_* flags the kernel accepted (vnet_hdr only)
        self.stats = PortStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._added_addrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        self._added_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._index = 0
        try:
            addrs = [ipaddress.ip_interface(a) for a in addresses]
            nets = [ipaddress.ip_network(r, strict=False) for r in routes]
        except ValueError as e:
            raise BackendError(f"TUN {name}: {e}") from None
        self._fd = _open_tun(name, dev_path, IFF_VNET_HDR if vnet_hdr else 0)
        try:
            if vnet_hdr:
                self._set_offloads()
            _off_loop(lambda: self._configure(mtu, addrs, nets), "configure")
        except BaseException:
            self._undo()
            os.close(self._fd)
            self._fd = -1
            raise

    # --- setup ------------------------------------------------------------------------------------

    def _set_offloads(self) -> None:
        """Header size 10; checksum + TSO4/6 offloads, and USO4/6 where the kernel knows them."""
        try:
            fcntl.ioctl(self._fd, TUNSETVNETHDRSZ, struct.pack("i", tun_offload.VNET_HDR_LEN))
        except OSError as e:
            raise BackendError(f"TUN {self.name}: TUNSETVNETHDRSZ: {e.strerror}") from None
        base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        for flags in (base | TUN_F_USO4 | TUN_F_USO6, base):
            try:
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
            except OSError as e:
                if e.errno == errno.EINVAL and flags != base:
                    continue  # a kernel before 6.2: no UDP segmentation offload
                raise BackendError(f"TUN {self.name}: TUNSETOFFLOAD: {e.strerror}") from None
            self.offloads = flags
            return

    def _configure(
        self,
        mtu: int,
        addrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> None:
        try:
            from pyroute2 import IPRoute
        except ImportError:
            raise BackendError("the TUN backend needs pyroute2: pip install pyroute2") from None
        step = "look up the device"
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if not found:
                    raise BackendError(f"TUN device {self.name} was created but is not visible over rtnetlink")
                self._index = int(found[0])
                step = f"set MTU {mtu} and bring the link up"
                ipr.link("set", index=self._index, mtu=mtu, state="up")
                if self.txqueuelen is not None:
                    step = f"set txqueuelen {self.txqueuelen}"
                    ipr.link("set", index=self._index, txqlen=self.txqueuelen)
                for a in addrs:
                    step = f"add address {a}"
                    kw: dict[str, Any] = {}
                    if a.version == 6:
                        kw["flags"] = IFA_F_NODAD
                    if self.scope is not None:
                        kw["scope"] = self.scope
                    ipr.addr("add", index=self._index, address=str(a.ip), prefixlen=a.network.prefixlen, **kw)
                    self._added_addrs.append(a)
                for n in nets:
                    step = f"add route {n}"
                    family = socket.AF_INET if n.version == 4 else socket.AF_INET6
                    ipr.route("add", dst=str(n), oif=self._index, family=family)
                    self._added_routes.append(n)
        except BackendError:
            raise
        except Exception as e:  # pyroute2's NetlinkError (attribute ``code``) or an OSError
            code = getattr(e, "code", None) or getattr(e, "errno", None)
            hint = ""
            if code == errno.EPERM:
                hint = "; run as root or with CAP_NET_ADMIN"
            elif code == errno.EEXIST:
                hint = "; it already exists on this machine (another tunnel or interface?)"
            elif code == errno.EINVAL and mtu < 1280:
                hint = f"; IPv6 needs an MTU of at least 1280 (the MTU is {mtu}: raise agent.tun_mtu)"
            why = os.strerror(code) if isinstance(code, int) and code > 0 else str(e)
            raise BackendError(f"TUN {self.name}: cannot {step}: {why}{hint}") from None

    def _undo(self) -> None:
        if not (self._added_routes or self._added_addrs):
            return
        with contextlib.suppress(Exception):
            _off_loop(self._remove_added, "clean up")
        self._added_routes.clear()
        self._added_addrs.clear()

    def _remove_added(self) -> None:
        with contextlib.suppress(Exception):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for n in reversed(self._added_routes):
                    family = socket.AF_INET if n.version == 4 else socket.AF_INET6
                    with contextlib.suppress(Exception):
                        ipr.route("del", dst=str(n), oif=self._index, family=family)
                for a in reversed(self._added_addrs):
                    with contextlib.suppress(Exception):
                        ipr.addr("del", index=self._index, address=str(a.ip), prefixlen=a.network.prefixlen)

    # --- PacketPort -------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        if self._fd < 0:
            raise BackendError(f"TUN {self.name} is closed")
        self._loop = loop
        loop.add_reader(self._fd, on_readable)

    def read_batch(self, limit: int) -> list[bytes]:
        out: list[bytes] = []
        fd = self._fd
        if fd < 0:
            return out
        read = os.read
        nbytes = 0
        size = READ_SIZE + (tun_offload.VNET_HDR_LEN if self.vnet_hdr else 0)
        while len(out) < limit:
            try:
                pkt = read(fd, size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self.stats.rx_errors += 1
                break
            if not pkt:
                break
            if self.vnet_hdr:
                pkts = tun_offload.unwrap(pkt)
                if not pkts:
                    self.stats.rx_errors += 1  # a virtio_net_hdr that does not parse
                elif len(pkts) > 1:
                    self.stats.rx_super += 1
                out.extend(pkts)
                nbytes += sum(len(p) for p in pkts)
                continue
            out.append(pkt)
            nbytes += len(pkt)
        self.stats.rx_packets += len(out)
        self.stats.rx_bytes += nbytes
        return out

    def write_batch(self, packets: Sequence[bytes]) -> int:
        fd = self._fd
        stats = self.stats
        if fd < 0:
            stats.tx_dropped += len(packets)
            return 0
        if self.vnet_hdr:
            return self._write_frames(fd, packets)
        write = os.write
        sent = 0
        nbytes = 0
        for pkt in packets:
            try:
                write(fd, pkt)
            except OSError:  # EAGAIN (BlockingIOError), ENOBUFS, EINVAL, ...: drop, never queue
                stats.tx_dropped += 1
                continue
            sent += 1
            nbytes += len(pkt)
        stats.tx_packets += sent
        stats.tx_bytes += nbytes
        return sent

    def _write_frames(self, fd: int, packets: Sequence[bytes]) -> int:
        """Behind the virtio header: runs of one TCP flow as one super-packet each (tun_offload.coalesce)."""
        stats = self.stats
        writev = os.writev
        sent = 0
        nbytes = 0
        for bufs, count, size in tun_offload.coalesce(packets):
            try:
                writev(fd, bufs)
            except OSError:  # EAGAIN (BlockingIOError), ENOBUFS, EINVAL, ...: drop, never queue
                stats.tx_dropped += count
                continue
            sent += count
            nbytes += size
            if count > 1:
                stats.tx_super += 1
        stats.tx_packets += sent
        stats.tx_bytes += nbytes
        return sent

    def close(self) -> None:
        """Remove the reader, the routes and addresses this port added, and the device; idempotent."""
        if self._fd < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            self._loop = None
        self._undo()
        fd, self._fd = self._fd, -1
        os.close(fd)

    def __repr__(self) -> str:
        return f"TunPort({self.name!r}, mtu={self.mtu}, fd={self._fd}, vnet_hdr={self.vnet_hdr})"
