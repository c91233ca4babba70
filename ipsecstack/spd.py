"""Security Policy Database (RFC 4301 §4.4.1): ordered policies of selectors -> action.

Theory of operation
-------------------
Policies live in two ordered lists, one per direction (SPD-O for outbound traffic, SPD-I for
plaintext arriving from the protected side); the first policy whose selector matches wins
(RFC 4301 §4.4.1: the SPD is ordered). Selectors are compiled to integer (network, mask) pairs and
port ranges once, at construction.

Lookups go through a bounded flow cache keyed by the packet's selector fields, so the linear walk
happens once per flow, not once per packet. Any change to the policy list bumps a generation counter
and clears the cache; the cache is cleared wholesale when it reaches its bound, so it never grows
without limit whatever an attacker sends.

Ports are matched as in Linux xfrm: for ICMP/ICMPv6 the "source port" is the message type and the
"destination port" the code. A packet whose ports are unknown (non-initial fragment: OPAQUE in
RFC 4301 §4.4.1.1) matches only selectors that do not constrain ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Literal

from ipsecstack.errors import ConfigError
from ipsecstack.wire.ip import OPAQUE

Direction = Literal["out", "in"]
PortSpec = int | tuple[int, int] | None

FLOW_CACHE_MAX: Final = 65536

_PROTO_NAMES: Final = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58, "sctp": 132}


class Action(Enum):
    BYPASS = "bypass"
    DISCARD = "discard"
    PROTECT = "protect"


def _network(value: str | None, field_name: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if value is None or value in ("", "any", "*"):
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(
            field_name, value, "give an address or CIDR prefix, e.g. 10.0.0.0/8 or 2001:db8::/32"
        ) from None


def _ports(value: PortSpec, field_name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, hi = (value, value) if isinstance(value, int) else value
    if not (0 <= lo <= hi <= 65535):
        raise ConfigError(field_name, value, "give a port 0-65535 or a range (low, high) with low <= high")
    if (lo, hi) == (0, 65535):
        return None
    return lo, hi


def _proto(value: int | str | None) -> int | None:
    if value is None or value in ("any", "*", 0):
        return None
    if isinstance(value, str):
        if value.lower() in _PROTO_NAMES:
            return _PROTO_NAMES[value.lower()]
        if value.isdigit():
            value = int(value)
        else:
            raise ConfigError("proto", value, f"use a protocol number or one of {', '.join(_PROTO_NAMES)}")
    if not 0 <= value <= 255:
        raise ConfigError("proto", value, "IP protocol numbers are 0-255")
    return value


@dataclass(frozen=True, slots=True, init=False)
class Selector:
    """Which packets a policy or SA applies to (RFC 4301 §4.4.1.1).

    ``src``/``dst`` are addresses or prefixes (``None`` = any, either family); ``proto`` a number or a
    name; ``sport``/``dport`` a port or an inclusive ``(low, high)`` range.
    """

    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    proto: int | None
    sport: tuple[int, int] | None
    dport: tuple[int, int] | None
    _compiled: tuple[int, int, int, int, int, int, int, int, int, int, int] = field(repr=False, compare=False)

    def __init__(
        self,
        src: str | None = None,
        dst: str | None = None,
        proto: int | str | None = None,
        sport: PortSpec = None,
        dport: PortSpec = None,
    ) -> None:
        s = _network(src, "src")
        d = _network(dst, "dst")
        if s is not None and d is not None and s.version != d.version:
            raise ConfigError("dst", dst, f"src is IPv{s.version}; src and dst must be the same family")
        object.__setattr__(self, "src", s)
        object.__setattr__(self, "dst", d)
        object.__setattr__(self, "proto", _proto(proto))
        object.__setattr__(self, "sport", _ports(sport, "sport"))
        object.__setattr__(self, "dport", _ports(dport, "dport"))
        family = s.version if s is not None else (d.version if d is not None else 0)
        sp = self.sport or (-2, 70000)
        dp = self.dport or (-2, 70000)
        object.__setattr__(
            self,
            "_compiled",
            (
                family,
                int(s.network_address) if s else 0,
                int(s.netmask) if s else 0,
                int(d.network_address) if d else 0,
                int(d.netmask) if d else 0,
                -1 if self.proto is None else self.proto,
                sp[0],
                sp[1],
                dp[0],
                dp[1],
                int(self.sport is not None or self.dport is not None),
            ),
        )

    def matches(self, flow: tuple[int, int, int, int, int, int]) -> bool:
        """Whether a ``(version, src, dst, proto, sport, dport)`` flow (see ``wire.ip.flow_of``) matches."""
        family, snet, smask, dnet, dmask, proto, splo, sphi, dplo, dphi, has_ports = self._compiled
        version, src, dst, fproto, sport, dport = flow
        if family and family != version:
            return False
        if src & smask != snet or dst & dmask != dnet:
            return False
        if proto >= 0 and proto != fproto:
            return False
        if has_ports:
            if sport == OPAQUE:
                return False
            if not (splo <= sport <= sphi and dplo <= dport <= dphi):
                return False
        return True

    def reversed(self) -> Selector:
        """The selector for the opposite direction (source and destination swapped)."""
        return Selector(
            str(self.dst) if self.dst else None,
            str(self.src) if self.src else None,
            self.proto,
            self.dport,
            self.sport,
        )

    def __str__(self) -> str:
        def ports(p: tuple[int, int] | None) -> str:
            return "" if p is None else (f":{p[0]}" if p[0] == p[1] else f":{p[0]}-{p[1]}")

        proto = "" if self.proto is None else f" proto {self.proto}"
        return f"{self.src or 'any'}{ports(self.sport)} -> {self.dst or 'any'}{ports(self.dport)}{proto}"


@dataclass(frozen=True, slots=True)
class Template:
    """How a PROTECT policy is to be applied: which SA (RFC 4301 §4.4.1.2 "processing info").

    Manual keying names the outbound SA by ``spi``; IKE-managed policies name a ``reqid`` shared by
    the policy and the SAs negotiated for it (as in Linux xfrm), so rekeyed SAs bind automatically.
    """

    protocol: Literal["esp", "ah"] = "esp"
    mode: Literal["tunnel", "transport"] = "tunnel"
    spi: int | None = None
    reqid: int | None = None
    tunnel_src: str | None = None
    tunnel_dst: str | None = None

    def __post_init__(self) -> None:
        if self.spi is None and self.reqid is None:
            raise ConfigError("template", self, "a PROTECT template needs an spi (manual keying) or a reqid (IKE)")


@dataclass(frozen=True, slots=True)
class Policy:
    """One SPD entry: selector, direction and action (with a template when the action is PROTECT)."""

    selector: Selector
    action: Action
    direction: Direction = "out"
    template: Template | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("out", "in"):
            raise ConfigError("direction", self.direction, "use 'out' or 'in'")
        if (self.action is Action.PROTECT) != (self.template is not None):
            raise ConfigError(
                "template", self.template, "PROTECT policies need a template; BYPASS and DISCARD take none"
            )


class SPD:
    """The ordered policy lists with a bounded per-flow lookup cache."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._lists: dict[str, list[Policy]] = {"out": [], "in": []}
        self._cache: dict[str, dict[tuple[int, int, int, int, int, int], Policy | None]] = {"out": {}, "in": {}}
        self.generation = 0
        self.listeners: list[Callable[[], None]] = []  # told of every change (a datapath's caches)
        for p in policies:
            self.add(p)

    def add(self, policy: Policy, index: int | None = None) -> None:
        """Append (or insert at ``index``, 0 = highest priority) a policy."""
        lst = self._lists[policy.direction]
        lst.insert(len(lst) if index is None else index, policy)
        self._changed()

    def remove(self, policy: Policy) -> None:
        self._lists[policy.direction].remove(policy)
        self._changed()

    def clear(self) -> None:
        for lst in self._lists.values():
            lst.clear()
        self._changed()

    def policies(self, direction: Direction) -> list[Policy]:
        return list(self._lists[direction])

    def __iter__(self) -> Iterator[Policy]:
        yield from self._lists["out"]
        yield from self._lists["in"]

    def __len__(self) -> int:
        return len(self._lists["out"]) + len(self._lists["in"])

    def _changed(self) -> None:
        self.generation += 1
        for c in self._cache.values():
            c.clear()
        for hook in self.listeners:
            hook()

    def lookup(self, direction: Direction, flow: tuple[int, int, int, int, int, int]) -> Policy | None:
        """The first policy of ``direction`` matching ``flow``, or ``None``."""
        cache = self._cache[direction]
        try:
            return cache[flow]
        except KeyError:
            pass
        found = None
        for p in self._lists[direction]:
            if p.selector.matches(flow):
                found = p
                break
        if len(cache) >= FLOW_CACHE_MAX:
            cache.clear()
        cache[flow] = found
        return found
