"""Transforms: ESP and AH protect/unprotect of whole IP packets, in transport or tunnel mode."""

from __future__ import annotations

from ipsecstack.sa import SecurityAssociation
from ipsecstack.xform import ah, esp


def protect(sa: SecurityAssociation, packet: bytes) -> bytes:
    """Protect one IP packet with an outbound SA; returns the packet to send (raises ``Dropped``)."""
    if sa.ctx is not None:
        return esp.protect(sa, packet)
    return ah.protect(sa, packet)


def unprotect(sa: SecurityAssociation, packet: bytes) -> bytes:
    """Verify and strip IPsec from one received IP packet (raises ``Dropped`` with the reason).

    For ESP in UDP the packet includes its IPv4/IPv6 and UDP headers.
    """
    if sa.ctx is not None:
        return esp.unprotect(sa, packet)
    return ah.unprotect(sa, packet)


__all__ = ["protect", "unprotect"]
