"""The native engine's own descriptors in transport mode, beside the NFQUEUE queues.

Theory of operation
-------------------
With the native engine and ``[agent] offloads`` (the defaults) the host's TCP leaves through a queue
of its own whose ESP packets the engine sends itself, and the host's ESP comes in without a queue,
the way the kernel's xfrm takes it in (``ipsecstack/agent/nfq_rules.py`` plans the rules):

- **Sending**: one ``IPPROTO_RAW`` socket per IP version (the :class:`~backends.rawsock.RawPort`'s),
  with ``SO_MARK`` = ``MARK``: the packets keep the protected packets' routes
  (``backends/esp_routes.py``) and the first rule of ``IPSECSTACK-OUT`` returns them at once.
- **Receiving**: the same port's raw ``IPPROTO_ESP`` socket. ``IPSECSTACK-IN`` accepts the peers' ESP
  instead of queueing it; the kernel, which has no ESP state for it, gives a copy to every raw ESP
  socket after the ``INPUT`` hook (so the firewall still decides what arrives) and drops its own.
  The engine's inbound thread (``native/fwd_in.c``) decrypts it, checks each flow against the inbound
  flow cache Python taught, and writes the plaintext into
- **the inject TUN** (``ipsq<in queue>``, with the virtio header): nothing is routed into it and
  nothing reads it; what the engine writes enters the host's stack as a received packet, TCP segments
  of a flow coalesced into super-packets (``native/fwd_coal.c``), as GRO would have merged them, which
  is most of what a received TCP segment costs. The device's only address is RFC 7600's IPv4 dummy
  ``192.0.0.8/32`` with host scope (the reverse-path filter refuses everything a device with no IPv4
  address receives); its filter is set to loose (``rp_filter = 2``: the peer is reachable, by another
  link), and ``IPSECSTACK-IN``
  accepts what comes from it first, because the engine or Python ran the RFC 4301 §5.2 check on it.
  Decrypted packets therefore arrive on ``ipsq<N>``, as charon's ``kernel-libipsec`` gives them on
  its ``ipsec0``; a firewall rule that names the physical interface does not see them.

ESP in UDP, AH, and unprotected plaintext that should have been protected stay on the in queue.
``close`` (after the engine stopped) closes the sockets and removes the device.
"""

from __future__ import annotations

from collections.abc import Iterable

from backends.esp_routes import MARK
from backends.rawsock import RawPort
from backends.tun import TunPort
from ipsecstack.runtime.io import BackendError

PROTO_ESP = 50
INJECT_PREFIX = "ipsq"
INJECT_MTU = 1500  # never used for what the device receives; it only has to be valid
RP_LOOSE = "2"
# RFC 7600's IPv4 dummy address, scope host: the reverse-path filter refuses every packet of a device
# with no IPv4 address whenever it is on (net/ipv4/fib_frontend.c), and host scope keeps the kernel from
# choosing it as any other route's source
DUMMY4 = "192.0.0.8/32"
RT_SCOPE_HOST = 254


def inject_name(queue_in: int) -> str:
    """The inject TUN of the agent whose in queue is ``queue_in`` (queue numbers are unique per host)."""
    return f"{INJECT_PREFIX}{queue_in}"


class EngineIO:
    """The raw sockets (by IP version) and the inject TUN the engine's threads use in transport mode."""

    def __init__(self, families: Iterable[int], inject: str) -> None:
        self.ports: dict[int, RawPort] = {}
        self.inject: TunPort | None = None
        try:
            for version in sorted(set(families)):
                port = RawPort(version, protocols=(PROTO_ESP,))
                self.ports[version] = port
                port.set_mark(MARK)
            v4 = 4 in self.ports
            self.inject = TunPort(inject, mtu=INJECT_MTU, vnet_hdr=True, addresses=[DUMMY4] if v4 else [],
                                  scope=RT_SCOPE_HOST)  # fmt: skip
            if v4:
                _loose_rp_filter(inject)
        except BaseException:
            self.close()
            raise

    def esp_fds(self) -> dict[int, int]:
        """The raw IPPROTO_ESP receiving sockets, by IP version."""
        return {v: dict(p.receive_fds())[PROTO_ESP] for v, p in self.ports.items()}

    def send_fds(self) -> dict[int, int]:
        """The IPPROTO_RAW sending sockets (with ``MARK``), by IP version."""
        return {v: p.send_fd() for v, p in self.ports.items()}

    def close(self) -> None:
        """Close the sockets and remove the device (idempotent); only once the engine has let go of them."""
        for port in self.ports.values():
            port.close()
        self.ports = {}
        tun, self.inject = self.inject, None
        if tun is not None:
            tun.close()


def _loose_rp_filter(dev: str) -> None:
    # the effective value is the larger of conf/all and conf/<dev> (Documentation/networking/ip-sysctl):
    # 2 on the device makes it loose whatever the host's default
    path = f"/proc/sys/net/ipv4/conf/{dev}/rp_filter"
    try:
        with open(path, "w") as f:
            f.write(RP_LOOSE)
    except OSError as e:
        raise BackendError(
            f"cannot set {path} to {RP_LOOSE} ({e.strerror}): the decrypted packets the inject TUN {dev} "
            "gives the host come from addresses routed by another link; this needs root"
        ) from None
