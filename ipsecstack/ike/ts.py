"""Traffic selectors (RFC 7296 §2.9, §3.13): conversion to/from SPD selectors and narrowing."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ipsecstack.ike import message as m
from ipsecstack.ike.const import TsType
from ipsecstack.spd import Selector

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Range:
    """One traffic selector: an address range, an IP protocol (0 = any) and a port range."""

    start: IPAddr
    end: IPAddr
    proto: int = 0
    port_lo: int = 0
    port_hi: int = 65535

    @classmethod
    def from_selector(cls, sel: Selector) -> Range:
        """A config selector (network in ``dst``, port in ``dport``) as a TS."""
        net = sel.dst or ipaddress.ip_network("0.0.0.0/0")
        lo, hi = sel.dport or (0, 65535)
        return cls(net.network_address, net.broadcast_address, sel.proto or 0, lo, hi)

    @classmethod
    def from_payload(cls, ts: m.TrafficSelector) -> Range:
        return cls(ipaddress.ip_address(ts.start_addr), ipaddress.ip_address(ts.end_addr), ts.ip_proto,
                   ts.start_port, ts.end_port)  # fmt: skip

    def to_payload(self) -> m.TrafficSelector:
        t = TsType.IPV4_ADDR_RANGE if self.start.version == 4 else TsType.IPV6_ADDR_RANGE
        return m.TrafficSelector(t, self.proto, self.port_lo, self.port_hi, self.start.packed, self.end.packed)

    def intersect(self, other: Range) -> Range | None:
        if self.start.version != other.start.version:
            return None
        if self.proto and other.proto and self.proto != other.proto:
            return None
        s = max(int(self.start), int(other.start))
        e = min(int(self.end), int(other.end))
        lo, hi = max(self.port_lo, other.port_lo), min(self.port_hi, other.port_hi)
        if s > e or lo > hi:
            return None
        version = self.start.version
        return Range(ipaddress.ip_address(s) if version == 4 else ipaddress.IPv6Address(s),
                     ipaddress.ip_address(e) if version == 4 else ipaddress.IPv6Address(e),
                     self.proto or other.proto, lo, hi)  # fmt: skip

    def networks(self) -> list[str]:
        """The range as CIDR prefixes (SPD selectors are prefixes)."""
        return [str(n) for n in ipaddress.summarize_address_range(self.start, self.end)]

    def __str__(self) -> str:
        nets = ",".join(self.networks())
        proto = f"[{self.proto}" if self.proto else ""
        ports = "" if (self.port_lo, self.port_hi) == (0, 65535) else f"/{self.port_lo}-{self.port_hi}"
        if proto or ports:
            return f"{nets}{proto or '['}{ports}]"
        return nets


def ranges(ts: m.TS) -> list[Range]:
    """The selectors of a TS payload that select something. RFC 7296 §3.13.1 gives each as a starting and an
    ending address; one whose start is above its end selects no address and is left out (a peer that sends
    only such selectors gets TS_UNACCEPTABLE, §2.9). Ports stay as they are: start above end is how OPAQUE
    ports are written (§3.13.1), and it selects no port here."""
    out = []
    for t in ts.selectors:
        r = Range.from_payload(t)
        if r.start.version == r.end.version and int(r.start) <= int(r.end):
            out.append(r)
    return out


def narrow(offered: list[Range], allowed: list[Range]) -> list[Range]:
    """Every non-empty intersection of what the peer offered with what our config allows (§2.9)."""
    out: list[Range] = []
    for o in offered:
        for a in allowed:
            x = o.intersect(a)
            if x is not None and x not in out:
                out.append(x)
    return out


def to_selectors(local: list[Range], remote: list[Range]) -> list[tuple[Selector, Selector]]:
    """(outbound, inbound) SPD selector pairs for a child SA's local/remote TS."""
    pairs: list[tuple[Selector, Selector]] = []
    for lr in local:
        for rr in remote:
            if lr.start.version != rr.start.version:
                continue
            proto = lr.proto or rr.proto or None
            lp = None if (lr.port_lo, lr.port_hi) == (0, 65535) else (lr.port_lo, lr.port_hi)
            rp = None if (rr.port_lo, rr.port_hi) == (0, 65535) else (rr.port_lo, rr.port_hi)
            for ln in lr.networks():
                for rn in rr.networks():
                    out = Selector(ln, rn, proto, lp, rp)
                    pairs.append((out, out.reversed()))
    return pairs
