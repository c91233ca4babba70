"""Virtual IP pools for remote-access clients (RFC 7296 §3.15: configuration payloads).

Theory of operation: a pool hands out addresses from a prefix or range; a lease is keyed by the
client's authenticated identity, so a client that reconnects gets its address back while the old IKE
SA is still being torn down. Leases are released when the IKE SA closes. The first and last
addresses of a prefix (network, broadcast) are never handed out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ipsecstack.errors import ConfigError

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Pool:
    name: str
    first: IPAddr
    last: IPAddr
    dns: list[IPAddr] = field(default_factory=list)
    leases: dict[bytes, IPAddr] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, addrs: str, dns: list[str], path: str) -> Pool:
        try:
            if "-" in addrs:
                a, b = (ipaddress.ip_address(x.strip()) for x in addrs.split("-", 1))
                first, last = a, b
            else:
                net = ipaddress.ip_network(addrs, strict=False)
                if net.num_addresses < 4:
                    raise ValueError("too small")
                first = ipaddress.ip_address(int(net.network_address) + 1) if net.version == 4 else \
                    ipaddress.IPv6Address(int(net.network_address) + 1)  # fmt: skip
                last = ipaddress.ip_address(int(net.broadcast_address) - 1) if net.version == 4 else \
                    ipaddress.IPv6Address(int(net.broadcast_address) - 1)  # fmt: skip
            resolvers = [ipaddress.ip_address(d) for d in dns]
        except (ValueError, IndexError):
            raise ConfigError(
                f"{path}.addrs", addrs, "give a prefix (10.9.0.0/24) or a range (10.9.0.10-10.9.0.99)"
            ) from None
        if first.version != last.version or int(first) > int(last):
            raise ConfigError(f"{path}.addrs", addrs, "the range must run from low to high in one address family")
        return cls(name, first, last, resolvers)

    def networks(self) -> list[str]:
        """The pool as CIDR prefixes (routed into the TUN device on a concentrator)."""
        return [str(n) for n in ipaddress.summarize_address_range(self.first, self.last)]

    def acquire(self, identity: bytes) -> IPAddr | None:
        """The client's address (the same one again for the same identity), or None when the pool is full."""
        if identity in self.leases:
            return self.leases[identity]
        used = {int(a) for a in self.leases.values()}
        for n in range(int(self.first), int(self.last) + 1):
            if n not in used:
                addr = ipaddress.ip_address(n) if self.first.version == 4 else ipaddress.IPv6Address(n)
                self.leases[identity] = addr
                return addr
        return None

    def release(self, identity: bytes) -> None:
        self.leases.pop(identity, None)


@dataclass(frozen=True)
class Lease:
    """The address a pool handed to one client identity, held by its IKE SA (and passed on by a rekey)."""

    pool: Pool
    key: bytes

    @property
    def address(self) -> str | None:
        addr = self.pool.leases.get(self.key)
        return None if addr is None else str(addr)

    def release(self) -> None:
        self.pool.release(self.key)
