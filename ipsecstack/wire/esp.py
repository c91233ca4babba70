"""ESP header and trailer layout (RFC 4303 §2).

0                   1                   2                   3
+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
|               Security Parameters Index (SPI)                 |
|                      Sequence Number                          |
|                    Payload Data* (variable: IV, then data)    |
|     Padding (0-255 bytes)     |  Pad Length   | Next Header   |
|         Integrity Check Value-ICV   (variable)                |
"""

from __future__ import annotations

import struct
from typing import Final

HEADER_LEN: Final = 8
TRAILER_LEN: Final = 2  # pad length + next header
HEADER = struct.Struct("!II")

#: Self-describing padding bytes 1, 2, 3, ... (RFC 4303 §2.4), indexed by pad length.
PAD: Final = tuple(bytes(range(1, n + 1)) for n in range(256))


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """``(spi, seq_low)`` of the ESP header at ``offset``."""
    spi, seq = HEADER.unpack_from(data, offset)
    return spi, seq


def pad_length(payload_len: int, block: int) -> int:
    """Padding needed so payload + padding + 2-byte trailer is a multiple of ``block`` (>= 4)."""
    return (-(payload_len + TRAILER_LEN)) % block
