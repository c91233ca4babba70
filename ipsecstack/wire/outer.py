"""Where the IPsec header of an IP packet is: the outer header's lengths, IPv6 extension headers, fragments.

A codec with no state: the datapath, the transforms and the outer-plane backends all locate ESP/AH (or
the UDP header of ESP in UDP) the same way, and refuse what IPsec does not process (fragments, RFC 4303
§3.4.1) with the same drop reasons.
"""

from __future__ import annotations

from ipsecstack.errors import Dropped, Reason
from ipsecstack.wire import ip


def parse_outer(pkt: bytes, inbound: bool = True) -> tuple[int, int, int, int]:
    """Locate the IPsec payload of a packet.

    Returns ``(version, off, nh_field, end)``: the IPsec (or UDP) header starts (inbound) or is to be
    inserted (outbound transport mode) at ``off``, ``pkt[nh_field]`` is the protocol byte naming it,
    and ``end`` is the end of the datagram per the IP header (link-layer padding beyond it is
    ignored). Over IPv6, a received ESP/AH header may follow destination options (RFC 4303 §3.1.1),
    so inbound parsing walks every extension header; outbound insertion goes after hop-by-hop,
    routing and fragment headers. Fragments are dropped: IPsec processes whole datagrams
    (RFC 4303 §3.4.1; transport mode applies to whole datagrams only, §3.3.4).
    """
    n = len(pkt)
    if n < 20:
        raise Dropped(Reason.TRUNCATED, "IP header")
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        end = (pkt[2] << 8) | pkt[3]
        if ihl < 20 or end < ihl or end > n:
            raise Dropped(Reason.MALFORMED, "IPv4 header lengths")
        if ip.ipv4_is_fragment(pkt):
            raise Dropped(Reason.FRAGMENT, "IPsec needs the reassembled datagram")
        return 4, ihl, 9, end
    if version == 6:
        if n < 40:
            raise Dropped(Reason.TRUNCATED, "IPv6 header")
        end = 40 + ((pkt[4] << 8) | pkt[5])
        if end > n:
            raise Dropped(Reason.MALFORMED, "IPv6 payload length")
        if inbound:
            off, nh_field, frag = _ipv6_walk(pkt, end)
        else:
            off, nh_field = ip.ipv6_transport_split(pkt[:end])
            frag = _ipv6_walk(pkt, off)[2]
        if frag:
            raise Dropped(Reason.FRAGMENT, "IPsec needs the reassembled datagram")
        return 6, off, nh_field, end
    raise Dropped(Reason.BAD_IP_VERSION, str(version))


_V6_EXT = (ip.PROTO_HOPOPTS, ip.PROTO_ROUTING, ip.PROTO_FRAGMENT, ip.PROTO_DSTOPTS)


def _ipv6_walk(pkt: bytes, stop: int) -> tuple[int, int, bool]:
    """Walk IPv6 extension headers up to ``stop``: ``(upper_off, nh_field, saw_fragment_header)``."""
    nh_field = 6
    nh = pkt[6]
    off = 40
    frag = False
    while nh in _V6_EXT and off < stop:
        if off + 8 > stop:
            raise Dropped(Reason.TRUNCATED, "IPv6 extension header")
        if nh == ip.PROTO_FRAGMENT:
            frag = True
            ext = 8
        else:
            ext = (pkt[off + 1] + 1) * 8
        nh_field = off
        nh = pkt[off]
        off += ext
    if off > stop:
        raise Dropped(Reason.TRUNCATED, "IPv6 extension header")
    return off, nh_field, frag
