"""AH header layout (RFC 4302 §2).

    +---------------+---------------+-------------------------------+
    | Next Header   |  Payload Len  |          RESERVED             |
    |                 Security Parameters Index (SPI)               |
    |                    Sequence Number Field                      |
    |                Integrity Check Value-ICV (variable)           |

Payload Len is the AH length in 32-bit words minus 2 (§2.2). The ICV field is padded so the header
is a multiple of 32 bits over IPv4 and of 64 bits over IPv6 (§3.3.3.2.1).
"""

from __future__ import annotations

import struct
from typing import Final

FIXED_LEN: Final = 12
HEADER = struct.Struct("!BBHII")


def icv_field_len(icv_len: int, ipv6: bool) -> int:
    """Length of the ICV field including the alignment padding for the IP version."""
    align = 8 if ipv6 else 4
    total = FIXED_LEN + icv_len
    return icv_len + (-total) % align


def build_header(next_header: int, spi: int, seq_low: int, icv_field: int) -> bytearray:
    """AH header with a zeroed ICV field of ``icv_field`` bytes."""
    total = FIXED_LEN + icv_field
    hdr = bytearray(total)
    HEADER.pack_into(hdr, 0, next_header, total // 4 - 2, 0, spi, seq_low)
    return hdr


def header_length(payload_len_field: int) -> int:
    """Bytes occupied by an AH header whose Payload Len field is ``payload_len_field``."""
    return (payload_len_field + 2) * 4
