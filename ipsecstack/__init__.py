"""ipsecstack: a userspace IPsec stack (RFC 4301 architecture, ESP RFC 4303, AH RFC 4302).

The package is a sans-IO core (no sockets, clock or OS randomness inside: ``now`` and ``rng`` are
passed in) plus an asyncio runtime and packet I/O backends built on it.

Manual keying in a few lines::

    from ipsecstack import SecurityAssociation, protect, unprotect

    key = bytes.fromhex("00112233445566778899aabbccddeeff" "01020304")  # AES-128 key + salt
    out = SecurityAssociation(0x1001, "esp", "tunnel", "aes128gcm16", key,
                              tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")
    inb = SecurityAssociation(0x1001, "esp", "tunnel", "aes128gcm16", key,
                              tunnel_src="192.0.2.1", tunnel_dst="192.0.2.2")
    wire = protect(out, ip_packet)        # outer IPv4 + ESP
    assert unprotect(inb, wire) == ip_packet
"""

from ipsecstack.datapath import Acquire, Datapath, IkeDatagram, Result
from ipsecstack.entropy import seeded_rng, system_rng
from ipsecstack.errors import ConfigError, Dropped, Reason
from ipsecstack.sa import Lifetime, SAEvent, SecurityAssociation
from ipsecstack.sad import SAD
from ipsecstack.spd import SPD, Action, Policy, Selector, Template
from ipsecstack.xform import protect, unprotect

__version__ = "0.1.0"

__all__ = [
    "SAD",
    "SPD",
    "Acquire",
    "Action",
    "ConfigError",
    "Datapath",
    "Dropped",
    "IkeDatagram",
    "Lifetime",
    "Policy",
    "Reason",
    "Result",
    "SAEvent",
    "SecurityAssociation",
    "Selector",
    "Template",
    "__version__",
    "protect",
    "seeded_rng",
    "system_rng",
    "unprotect",
]
