"""What an IKE SA works with: its configuration (:class:`PeerConfig`, :class:`ChildConfig`), what it
emits (:class:`Datagram`; the events are in :mod:`events`), identities, and RFC constants. No state, no I/O."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from ipsecstack.ike import auth
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import IdType, Notify, Protocol
from ipsecstack.ike.dn import DnError, dn_from_text, dn_matches, dn_text, parse_dn, same_dn
from ipsecstack.ike.pools import Pool
from ipsecstack.ike.ts import Range

# RFC 7296 §3.15: configuration payload types and attributes
CFG_REQUEST = 1
CFG_REPLY = 2
CP_INTERNAL_IP4_ADDRESS = 1
CP_INTERNAL_IP4_DNS = 3
CP_INTERNAL_IP6_ADDRESS = 8
CP_INTERNAL_IP6_DNS = 10
NAT_T_PORT = 4500
# RFC 4302 §3.3.3: AH's ICV covers the outer IP addresses, which a NAT rewrites (RFC 3948 carries ESP only)
AH_NAT = "AH cannot cross a NAT (RFC 4302 authenticates the outer IP header; RFC 3948 encapsulates ESP only)"


@dataclass
class ChildConfig:
    name: str
    local_ts: list[Range]
    remote_ts: list[Range]
    proposals: list[props.Algorithms]
    mode: str = "tunnel"
    rekey_time: float | None = 3600.0  # seconds until the initiator of the child SA rekeys it
    replay_window: int = 64  # anti-replay window of the inbound SA (RFC 4303 §3.4.3)
    life_time: float | None = None  # hard limit of the SAs (the datapath drops them then)
    rekey_bytes: int | None = None  # rekey after this much traffic (soft limit of the SAs)
    rekey_packets: int | None = None
    close_action: str = "none"  # the peer closed it (or its IKE SA): "none", "trap" or "start"
    dpd_action: str = "clear"  # its IKE SA's peer is dead (§2.4): "clear", "trap" or "restart"
    updown: tuple[str, ...] = ()  # script and arguments run when it comes up and goes down (runtime/updown.py)

    @property
    def ike_protocol(self) -> int:
        """The IPsec protocol of its proposals (RFC 7296 §3.3.1 Protocol ID): ESP, or AH (ah_proposals)."""
        return Protocol.AH if self.proposals and self.proposals[0].protocol == Protocol.AH else Protocol.ESP

    @property
    def protocol(self) -> Literal["esp", "ah"]:
        return "ah" if self.ike_protocol == Protocol.AH else "esp"


@dataclass
class PeerConfig:
    """What an IKE SA needs to know about its peer (built from ``[connections.<name>]``)."""

    name: str
    local_addr: str
    remote_addr: str | None
    proposals: list[props.Algorithms]
    local_id: tuple[int, bytes]
    remote_id: tuple[int, bytes] | None
    psk: bytes = field(repr=False)
    children: list[ChildConfig] = field(default_factory=list)
    creds: auth.Credentials = field(default_factory=auth.Credentials)  # how each side authenticates
    local_port: int = 500
    remote_port: int = 500
    retransmit_timeout: float = 2.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    half_open_timeout: float = 30.0
    encap: bool = False  # force UDP encapsulation: announce a NAT (as strongSwan's encap = yes does)
    pools: list[Pool] = field(default_factory=list)  # virtual IPs for remote-access clients (§3.15)
    request_vip: bool = False  # as a client: ask the peer for a virtual IPv4 address
    dpd_delay: float | None = None  # liveness check after this much silence (§2.4)
    rekey_time: float | None = 14400.0  # IKE SA rekeying (CREATE_CHILD_SA, §1.3.2)
    rekey_jitter: float = 0.1  # rekey up to this fraction early, so both ends do not rekey at once
    rand_time: float | None = None  # strongSwan's rand_time: IKE rekey/reauth up to this early (None: rekey_jitter)
    over_time: float | None = None  # hard lifetime = rekey_time + this (None: 10% of rekey_time, as strongSwan)
    reauth_time: float | None = None  # make-before-break reauthentication: a new IKE SA this long after (§2.8.3)
    unique: str = "no"  # responder: IKE SAs of the same peer identity ("no", "never", "replace", "keep"; manager)


@dataclass
class Datagram:
    data: bytes
    dst: str
    dst_port: int
    src_port: int  # 4500: the caller prepends the non-ESP marker (RFC 3948 §2.2)


REAUTH_RETRY_DELAY = 30.0  # a failed reauthentication is tried again this much later ...
REAUTH_TRIES = 5  # ... this many times in all; then the IKE SA stays until it expires (over_time) or is deleted
REDUNDANT = "redundant after a simultaneous rekey (RFC 7296 §2.8.2)"  # why such an IKE SA closes


def identity(text: str) -> tuple[int, bytes]:
    """An IKE identity from strongSwan-style text: an IP address, an FQDN, user@fqdn, keyid:..., or a DN.

    A DN is written as strongSwan does (``C=CH, O=example, CN=gw.example``); a bad one raises ValueError.
    """
    if text.startswith("keyid:"):
        return IdType.ID_KEY_ID, text[6:].encode()
    if "=" in text:
        try:
            return IdType.ID_DER_ASN1_DN, dn_from_text(text)
        except DnError as e:
            raise ValueError(f"not a distinguished name: {e}") from None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return (IdType.ID_IPV4_ADDR if addr.version == 4 else IdType.ID_IPV6_ADDR), addr.packed
    if "@" in text:
        return IdType.ID_RFC822_ADDR, text.encode()
    return IdType.ID_FQDN, text.encode()


def id_text(id_type: int, data: bytes) -> str:
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        try:
            return str(ipaddress.ip_address(data))
        except ValueError:
            return data.hex()
    if id_type == IdType.ID_KEY_ID:
        return "keyid:" + data.decode(errors="replace")
    if id_type == IdType.ID_DER_ASN1_DN:
        return dn_text(data)
    return data.decode(errors="replace")


def nat_hash(spi_i: bytes, spi_r: bytes, addr: str, port: int) -> bytes:
    """RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | Port)."""
    return hashlib.sha1(spi_i + spi_r + ipaddress.ip_address(addr).packed + port.to_bytes(2, "big")).digest()


def same_identity(a: tuple[int, bytes], b: tuple[int, bytes]) -> bool:
    """Two IKE identities are the same; DNs compare attribute by attribute (RFC 4517 matching, simplified)."""
    if a[0] == b[0] == IdType.ID_DER_ASN1_DN:
        return same_dn(a[1], b[1])
    return a == b


# how well a peer's identity matches ``remote.id`` (profile selection, RFC 7296 §2.15 leaves it to policy)
ID_MATCH_EXACT = 100  # the same identity
ID_MATCH_ANY = 1  # no remote.id (%any): any identity


def is_wildcard(ident: tuple[int, bytes] | None) -> bool:
    """A ``remote.id`` pattern (``*@example.com``, ``*.example.com``, ``C=CH, O=example, CN=*``): never sent as IDr."""
    return ident is not None and _wildcards(ident) > 0


def _wildcards(ident: tuple[int, bytes]) -> int:
    if ident[0] in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
        return ident[1].count(b"*")
    if ident[0] == IdType.ID_DER_ASN1_DN:
        try:
            return sum(v == "*" for rdn in parse_dn(ident[1]) for _, v in rdn)
        except DnError:
            return 0
    return 0


def match_identity(want: tuple[int, bytes] | None, got: tuple[int, bytes]) -> int:
    """How well the identity a peer sent (``got``) matches ``remote.id`` (``want``): 0 not at all, ``ID_MATCH_ANY``
    with no remote.id, ``ID_MATCH_EXACT`` for the same identity, in between for a pattern (fewer ``*``, higher).

    A ``*`` in an FQDN or RFC 822 pattern stands for any run of characters (case-insensitive, like DNS); in a DN
    it is a whole attribute value: ``C=CH, O=example, CN=*`` matches every CN of that O (same attributes, in order).
    """
    if want is None:
        return ID_MATCH_ANY
    n = _wildcards(want)
    if n == 0:
        return ID_MATCH_EXACT if same_identity(want, got) else 0
    if want[0] != got[0]:
        return 0
    score = max(ID_MATCH_ANY + 1, ID_MATCH_EXACT - n)
    if want[0] == IdType.ID_DER_ASN1_DN:
        return score if dn_matches(want[1], got[1]) else 0
    return score if _glob(want[1].decode(errors="replace"), got[1].decode(errors="replace")) else 0


def _glob(pattern: str, text: str) -> bool:
    """``*`` matches any run of characters, case-insensitively. Linear in the (peer-chosen) text: the fixed parts
    are found leftmost, in order, between the prefix and the suffix (no backtracking regex)."""
    first, *middle, last = pattern.casefold().split("*")
    text = text.casefold()
    if len(text) < len(first) + len(last) or not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    for part in middle:
        found = text.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def _hashes(msg: m.Message) -> frozenset[int] | None:
    n = next((n for n in msg.notifies() if n.notify_type == Notify.SIGNATURE_HASH_ALGORITHMS), None)
    return None if n is None else auth.parse_hashes(n.data)


def _notify_name(n: int) -> str:
    try:
        return Notify(n).name
    except ValueError:
        return str(n)
