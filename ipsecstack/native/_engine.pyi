# Type stub of the C extension ipsecstack/native/_engine.c (see engine.h for the theory of operation).
from collections.abc import Sequence
from typing import Any, Final, Literal

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
        tuple[Literal["soft", "hard", "seen"], Literal["in", "out"], int, Literal["seconds", "bytes", "packets", "seq"]]
    ]: ...
    def rearm_seen(self, spis: Sequence[int]) -> None: ...
    # --- the forwarder (fwd.h): threads that own the TUN fd and the outer sockets -------------------
    def fwd_start(
        self,
        tun_fd: int,
        outer: Sequence[tuple[str, int]],
        *,
        batch: int = 64,
        punt_capacity: int = 4096,
        cache_size: int = 65536,
        tso: bool = False,
        coalesce: bool = False,
        gso: bool = False,
        gro: bool = False,
        codel_target_us: int = 0,
        codel_interval_us: int = 100000,
    ) -> int:
        """Start; ``outer`` kinds: udp4/udp6 (ESP-in-UDP socket), esp4/esp6 (raw ESP rx), raw4/raw6 (IPPROTO_RAW tx).
        Returns the punt eventfd (owned by the engine, closed by fwd_stop).
        Offloads: ``tso`` the TUN carries a virtio_net_hdr (TunPort(vnet_hdr=True)): super-packets are cut,
        unfinished checksums finished, writes get a zero header; ``coalesce`` (needs tso) inbound TCP segments
        of a flow written as one GSO super-packet; ``gso`` UDP_SEGMENT sends of equal-size runs on udp4/udp6;
        ``gro`` UDP_GRO on udp4/udp6 (turned off again by fwd_stop); ``codel_target_us`` > 0: CoDel (RFC 8289)
        drops ESP that waited longer than that in a receive socket for ``codel_interval_us`` (queue_delay)."""
    def fwd_stop(self) -> None: ...
    def learn_out(self, pkt: Buffer, spi: int | None, *, mtu: int = 0) -> None:
        """``mtu``: the NFQUEUE threads punt the flow's packets whose protected form would exceed it (0: none)."""
    def learn_in(self, spi: int, inner: Buffer) -> None: ...
    def flush(self) -> None: ...
    def take_punts(self, max: int = 256) -> list[tuple[Any, ...]]:
        """("out", pkt) | ("in", spi, inner) | ("outer", pkt), oldest first."""
    def fwd_stats(self) -> dict[str, Any]:
        """running; out_packets/out_bytes (sent on the outer sockets), in_packets/in_bytes (written to the inner
        fd); syscalls; batches_out/batches_in; punts {out, in, outer} (queued); punt_dropped; punt_waiting;
        tx_errors/rx_errors {udp4, udp6, esp4, esp6, raw4, raw6, tun}; cache {out: {entries, hits, misses},
        in: {...}, flushes}; drops {reason: n}; failed (a thread could not start); vnet_hdr;
        offloads {tso, coalesce, gso, gro}; tso {super, segments, csum_completed}; gso {sends, segments};
        gro {super, segments}; coalesced {writes, segments}. Kept after fwd_stop (until the next fwd_start);
        nfq {queues, received, accepted, dropped, python_verdicts,
        kernel_errors, malformed, tx_errors, truncated, too_big, qout, qin, qouter, qseg,
        tcp_queue {super, segments, csum_finished, raw_sent}}."""
    # --- the NFQUEUE threads (nfq.h, fwd_nfq.c): transport mode on bound netfilter queues ------------
    def nfq_start(
        self,
        queues: Sequence[tuple[str, int, int, int | None]],
        *,
        batch: int = 64,
        punt_capacity: int = 4096,
        cache_size: int = 65536,
        encap_ports: Sequence[int] = (4500,),
        coalesce: bool = True,
        raw4: int | None = None,
        raw6: int | None = None,
        esp4: int | None = None,
        esp6: int | None = None,
        inject: int | None = None,
    ) -> int:
        """esp4/esp6 (raw IPPROTO_ESP sockets) with inject (a TUN fd): an inbound thread decrypts the ESP
        they receive into the TUN and punts ("in", spi, inner) | ("outer", pkt) as fwd_start's does.
        queues: ("out" | "in" | "tcp", netlink fd, queue_num, mark | None). Returns the punt eventfd; punts
        are ("qout", queue_num, id, pkt) | ("qin", queue_num, id, spi, inner) | ("qouter", queue_num, id, pkt)
        | ("qseg", segment). coalesce: in-order TCP segments of a flow in one in-queue round are accepted
        as one packet. A "tcp" queue takes GSO super-packets whole and sends its ESP packets on the
        IPPROTO_RAW sockets raw4 / raw6 (fwd_nfq_gso.c)."""
    def nfq_stop(self) -> None: ...
    def nfq_verdict(self, queue_num: int, packet_id: int, payload: Buffer | None, mark: int | None = None) -> bool:
        """ACCEPT with payload as the packet (and mark), or DROP (None); False when the kernel refused it."""
    def nfq_send(self, packet: Buffer) -> bool:
        """A "qseg" punt's answer on the raw socket of its IP version; False when none or refused."""

# --- the NFQUEUE netlink codec (nfq.c), for tests and fuzzing --------------------------------------
def tcp_merge(packets: Sequence[bytes], max_segments: int = 16, max_bytes: int = 24576) -> list[bytes | None]:
    """The NFQUEUE in queue's TCP coalescing (fwd_coal.c) on bytes, for tests: per packet, what its verdict
    carries, or None when another packet of the run took it in."""

def codel_trace(target_ns: int, interval_ns: int, dequeues: Sequence[tuple[int, int]]) -> list[bool]:
    """CoDel's drop decision (codel.c, RFC 8289) per (now_ns, sojourn_ns) dequeue, in order, for tests."""

def nfq_parse(data: Buffer) -> list[tuple[Any, ...]]:
    """("packet" | "bad_packet", queue_num, id, payload | None, cap_len, mark | None, skbinfo) | ("error", errno) |
    ("other",) | ("malformed",), in order; a "malformed" entry ends the list."""

def nfq_build_verdict(
    queue_num: int, packet_id: int, verdict: int, payload: Buffer | None, mark: int | None
) -> bytes: ...
def nfq_config_copy(queue_num: int, copy_range: int) -> bytes: ...
def nfq_config_flags(queue_num: int, flags: int, mask: int) -> bytes: ...
def inet_sum(data: Buffer, start: int = 0) -> int:
    """The folded ones' complement sum of data's network-order 16-bit words, plus start (fwd_seg.c)."""
