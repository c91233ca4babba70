"""The NFQUEUE in queue's TCP coalescing (fwd_coal.c ``ips_merge``), checked with scapy; no root needed.

A round's in-order TCP segments of one flow become one packet, as the kernel's GRO builds them: the first
segment's headers with the run's length, the IPv4 header checksum and a full TCP checksum (the kernel
verifies it: nfqnl_mangle leaves CHECKSUM_NONE), PSH from the last segment, and every segment's payload
in order. Whatever GRO would not merge stays a packet of its own.
"""

from __future__ import annotations

import random
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from tests.native.native_helpers import needs_native

pytestmark = needs_native

MSS = 1000


def _merge(pkts: list[bytes], **kw: int) -> list[bytes | None]:
    from ipsecstack.native import _engine as e

    mod: ModuleType = e
    return mod.tcp_merge(pkts, **kw)  # type: ignore[no-any-return]


def _seg(i: int, *, v6: bool = False, sport: int = 40000, flags: str = "A", size: int = MSS, seq0: int = 7,
         ts: bool = True) -> bytes:  # fmt: skip
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (100, 200))] if ts else []
    l3: Packet = IPv6(src="fd00::1", dst="fd00::2", tc=0) if v6 else IP(src="10.0.0.1", dst="10.0.0.2", flags="DF")
    tcp = TCP(sport=sport, dport=5201, seq=seq0 + i * MSS, ack=99, flags=flags, window=512, options=opts)
    return bytes(l3 / tcp / Raw(bytes([i & 0xFF]) * size))


def _checksums_valid(pkt: bytes) -> bool:
    """scapy recomputes each checksum from scratch: they must equal what the packet carries."""
    p: Packet = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    fresh = p.copy()
    if IP in fresh:
        del fresh[IP].chksum
    del fresh[TCP].chksum
    again: Packet = IP(bytes(fresh)) if pkt[0] >> 4 == 4 else IPv6(bytes(fresh))
    if IP in p and p[IP].chksum != again[IP].chksum:
        return False
    return bool(p[TCP].chksum == again[TCP].chksum)


def test_a_run_becomes_one_packet_with_valid_checksums() -> None:
    for v6 in (False, True):
        segs = [_seg(i, v6=v6) for i in range(5)]
        segs[-1] = _seg(4, v6=v6, flags="PA")
        out = _merge(segs)
        assert out[1:] == [None] * 4
        merged = out[0]
        assert merged is not None and _checksums_valid(merged)
        p: Packet = IPv6(merged) if v6 else IP(merged)
        assert bytes(p[TCP].payload) == b"".join(bytes([i]) * MSS for i in range(5))
        assert p[TCP].seq == 7 and p[TCP].flags == "PA" and p[TCP].options == IP(_seg(0))[TCP].options
        assert (p.plen + 40 if v6 else p.len) == len(merged)


def test_what_gro_would_not_merge_stays_apart() -> None:
    udp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"u" * 100))
    pure_ack = _seg(9, size=0)
    gap = _seg(5)  # after segment 2: not the next sequence number
    syn = _seg(0, flags="S", size=0, ts=False)
    pkts = [syn, _seg(0), _seg(1), _seg(2), udp, gap, pure_ack]
    out = _merge(pkts)
    assert out[0] == syn and out[4] == udp and out[6] == pure_ack
    assert out[2] is None and out[3] is None and out[1] is not None and len(IP(out[1])[TCP].payload) == 3 * MSS
    assert out[5] == gap  # a run of one is left as it was


def test_interleaved_flows_merge_each_and_limits_hold() -> None:
    a = [_seg(i, sport=1000) for i in range(6)]
    b = [_seg(i, sport=2000, seq0=5000) for i in range(6)]
    interleaved = [p for pair in zip(a, b, strict=True) for p in pair]
    out = _merge(interleaved)
    kept = [IP(p) for p in out if p is not None]
    assert sorted((p[TCP].sport, len(p[TCP].payload)) for p in kept) == [(1000, 6 * MSS), (2000, 6 * MSS)]
    assert all(_checksums_valid(bytes(p)) for p in kept)
    # at most max_segments per run, and at most max_bytes of payload
    out = _merge(a, max_segments=4)
    assert [len(IP(p)[TCP].payload) for p in out if p is not None] == [4 * MSS, 2 * MSS]
    out = _merge(a, max_bytes=2500)
    assert [len(IP(p)[TCP].payload) for p in out if p is not None] == [2 * MSS, 2 * MSS, 2 * MSS]


def test_a_shorter_segment_ends_the_run_and_different_options_do_not_merge() -> None:
    short = _seg(2, size=300)
    out = _merge([_seg(0), _seg(1), short, _seg(3)])
    assert out[1] is None and out[2] is None
    assert len(IP(out[0])[TCP].payload) == 2 * MSS + 300  # type: ignore[arg-type]
    no_ts = _seg(1, ts=False)
    out = _merge([_seg(0), no_ts])
    assert out == [_seg(0), no_ts]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([1000, 2000, 3000]), st.integers(0, 3), st.sampled_from(["A", "PA", "FA"]),
                          st.sampled_from([MSS, MSS, MSS, 10, 0])), min_size=1, max_size=40))  # fmt: skip
def test_merging_keeps_every_flows_bytes_in_order(spec: list[tuple[int, int, str, int]]) -> None:
    """Random streams of a few flows (gaps, PSH/FIN, short and empty segments): whatever merges, each flow's
    payload reaches the stack complete and in order, and every packet that changed has valid checksums."""
    nxt: dict[int, int] = {}
    pkts: list[bytes] = []
    for sport, skip, flags, size in spec:
        seq = nxt.get(sport, 0) + skip * MSS
        nxt[sport] = seq + size
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
        tcp = TCP(sport=sport, dport=80, seq=seq, ack=1, flags=flags, window=100, options=opts)
        pkts.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / tcp / Raw(bytes([sport // 1000]) * size)))
    out = _merge(pkts)
    assert len(out) == len(pkts)

    def stream(packets: list[bytes | None]) -> dict[int, list[tuple[int, bytes]]]:
        flows: dict[int, list[tuple[int, bytes]]] = {}
        for p in packets:
            if p is not None:
                t = IP(p)[TCP]
                flows.setdefault(t.sport, []).append((t.seq, bytes(t.payload)))
        return flows

    def joined(segs: list[tuple[int, bytes]]) -> bytes:
        return b"".join(b for _s, b in segs)

    before, after = stream(list(pkts)), stream(out)
    assert {k: joined(v) for k, v in after.items()} == {k: joined(v) for k, v in before.items()}
    for i, p in enumerate(out):
        if p is not None and p != pkts[i]:
            assert _checksums_valid(p)


def test_garbage_never_crashes_the_merge() -> None:
    rng = random.Random(7)
    base = [_seg(i) for i in range(8)] + [_seg(i, v6=True) for i in range(4)]
    for _ in range(300):
        pkts = []
        for p in rng.sample(base, rng.randint(1, len(base))):
            b = bytearray(p)
            for _ in range(rng.randint(0, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            pkts.append(bytes(b[: rng.randint(0, len(b))] if rng.random() < 0.2 else b))
        out = _merge(pkts, max_segments=rng.randint(1, 64), max_bytes=rng.randint(0, 70000))
        assert len(out) == len(pkts) and all(o is None or isinstance(o, bytes) for o in out)
