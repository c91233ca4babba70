# Type stub of the C extension ipsecstack/native/_engine.c (see engine.h for the theory of operation).
from collections.abc import Sequence
from typing import Final, Literal

Buffer = bytes | bytearray | memoryview

REASONS: Final[tuple[str, ...]]
TRANSFORMS: Final[tuple[str, ...]]
OPENSSL_VERSION: Final[str]
MAX_DATAGRAM: Final[int]
EVENT_QUEUE: Final[int]

class Engine:
    def __init__(self) -> None: ...
    def install(
        self,
        spi: int,
        direction: str,
        transform: str,
        key: Buffer,
        *,
        mode: str = "tunnel",
        tunnel_src: bytes | None = None,
        tunnel_dst: bytes | None = None,
        esn: bool = False,
        replay_window: int = 64,
        udp_encap: tuple[int, int] | None = None,
        soft_bytes: int | None = None,
        soft_packets: int | None = None,
        hard_bytes: int | None = None,
        hard_packets: int | None = None,
        seq: int = 0,
        replay_top: int = 0,
        replay_seen: Sequence[int] | None = None,
        ttl: int = 64,
        copy_dscp: bool = True,
        ecn: str = "normal",
        df: str = "copy",
    ) -> None: ...
    def remove(self, direction: str, spi: int) -> bool: ...
    def protect(self, spi: int, packets: Sequence[Buffer], rand: bytes | None = None) -> list[bytes | str]: ...
    def unprotect(self, packets: Sequence[Buffer]) -> list[bytes | str]: ...
    def expire(self, direction: str, spi: int, hard: bool) -> bool: ...
    def move(self, spi: int, tunnel_dst: bytes | None = None, dport: int | None = None) -> None: ...
    def sa_stats(self, direction: str, spi: int) -> dict[str, object]: ...
    def stats(self) -> dict[str, object]: ...
    def sas(self) -> list[tuple[str, int]]: ...
    def poll_events(
        self,
    ) -> list[
        tuple[Literal["soft", "hard"], Literal["in", "out"], int, Literal["seconds", "bytes", "packets", "seq"]]
    ]: ...
