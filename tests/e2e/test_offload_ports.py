"""The Python datapath's offloads, without root: TUN TSO cutting and TCP coalescing (backends/tun_offload.py)
checked with scapy, and UDP GSO/GRO on a pair of UdpEncapPorts over loopback.

The native engine's cutter is checked against the same Python code in tests/native/test_native_fwd_offload.py;
tests/netns/test_tunnel.py carries TCP through two daemons on real TUN devices with these offloads on.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from backends import tun_offload as t
from backends.udp import UdpEncapPort

HDR = struct.Struct("=BBHHHH")
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (11, 22))]


def valid(seg: bytes) -> bool:
    """scapy recomputes the L4 (and IPv4 header) checksum to the value the segment carries."""
    p = IP(seg) if seg[0] >> 4 == 4 else IPv6(seg)
    l4 = TCP if TCP in p else UDP
    q = p.copy()
    del q[l4].chksum
    if IP in q:
        del q[IP].chksum
    r = type(p)(bytes(q))
    return r[l4].chksum == p[l4].chksum and (IP not in p or r[IP].chksum == p[IP].chksum)


def partial(pkt: bytes, l3: int, off: int) -> bytes:
    b = bytearray(pkt)
    proto = b[9] if b[0] >> 4 == 4 else b[6]
    struct.pack_into("!H", b, l3 + off, t.pseudo(b, proto, len(b) - l3))
    return bytes(b)


def tcp(version: int, payload: bytes, seq: int = 1000, flags: str = "A", sport: int = 40000, ident: int = 7) -> bytes:
    ip = IP(src="10.1.0.1", dst="10.2.0.1", id=ident, flags="DF") if version == 4 else IPv6(src="fd00::1", dst="fd00::")
    return bytes(ip / TCP(sport=sport, dport=5201, seq=seq, ack=9, flags=flags, window=512, options=OPTS) / payload)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [1, 999, 1000, 4 * 1000 + 123])
def test_a_tcp_super_packet_is_cut_into_valid_segments(version: int, size: int) -> None:
    payload = bytes(random.Random(size).randrange(256) for _ in range(size))
    l3 = 20 if version == 4 else 40
    sup = partial(tcp(version, payload, seq=0xFFFFFF00, flags="FPAC"), l3, 16)
    gso = t.GSO_TCPV4 if version == 4 else t.GSO_TCPV6
    segs = t.unwrap(HDR.pack(t.F_NEEDS_CSUM, gso | t.GSO_ECN, l3 + 32, 1000, l3, 16) + sup)
    assert len(segs) == max(1, -(-size // 1000))
    assert all(valid(s) for s in segs)
    parsed = [(IP(s) if version == 4 else IPv6(s))[TCP] for s in segs]
    assert b"".join(bytes(p.payload) for p in parsed) == payload
    assert [p.seq for p in parsed] == [(0xFFFFFF00 + 1000 * i) & 0xFFFFFFFF for i in range(len(segs))]
    n = len(segs)
    # CWR on the first segment only, FIN and PSH on the last only
    assert [str(p.flags) for p in parsed] == (["AC"] + ["A"] * (n - 2) + ["FPA"] if n > 1 else ["FPAC"])
    if version == 4:
        assert [IP(s).id for s in segs] == [7 + i for i in range(len(segs))]


@pytest.mark.parametrize("version", [4, 6])
def test_a_udp_super_packet_is_cut_into_valid_datagrams(version: int) -> None:
    ip = IP(src="10.1.0.1", dst="10.2.0.1") if version == 4 else IPv6(src="fd00::1", dst="fd00::2")
    payload = bytes(range(256)) * 10
    l3 = 20 if version == 4 else 40
    sup = partial(bytes(ip / UDP(sport=1, dport=2) / payload), l3, 6)
    segs = t.unwrap(HDR.pack(t.F_NEEDS_CSUM, t.GSO_UDP_L4, l3 + 8, 1200, l3, 6) + sup)
    assert [len(s) - l3 - 8 for s in segs] == [1200, 1200, 160]
    assert all(valid(s) for s in segs)


def test_headers_that_do_not_parse_give_no_packet() -> None:
    good = partial(tcp(4, bytes(3000)), 20, 16)
    assert t.unwrap(b"\0" * 5) == []
    assert t.unwrap(HDR.pack(0, t.GSO_TCPV4, 40, 0, 0, 0) + good) == []  # gso_size 0
    assert t.unwrap(HDR.pack(0, t.GSO_TCPV6, 40, 1000, 0, 0) + good) == []  # the wrong IP version
    assert t.unwrap(HDR.pack(0, t.GSO_TCPV4, 40, 1000, 0, 0) + good[:-3]) == []  # length != bytes read
    assert t.unwrap(HDR.pack(t.F_NEEDS_CSUM, 0, 0, 0, 20, 5) + good) == []  # an odd checksum offset


def frames_to_packets(frames: list[tuple[t.Frame, int, int]]) -> list[bytes]:
    """What the kernel makes of the writes: each one read back through unwrap (it cuts super-packets)."""
    out: list[bytes] = []
    for bufs, count, size in frames:
        got = t.unwrap(b"".join(bytes(b) for b in bufs))
        assert len(got) == count and sum(len(g) for g in got) == size
        out.extend(got)
    return out


@pytest.mark.parametrize("version", [4, 6])
def test_in_order_segments_of_one_flow_become_one_super_packet(version: int) -> None:
    # (IPv4 IDs counting up, as the kernel numbers the segments it cuts)
    segs = [tcp(version, bytes([i]) * 1000, seq=1000 + 1000 * i, ident=i) for i in range(5)]
    segs.append(tcp(version, b"z" * 400, seq=6000, flags="PA", ident=5))
    frames = t.coalesce(segs)
    assert [f[1] for f in frames] == [6]
    flags, gso_type, hdr_len, gso_size, start, off = HDR.unpack(bytes(frames[0][0][0]))
    l3 = 20 if version == 4 else 40
    assert (flags, gso_type, hdr_len, gso_size, start, off) == (
        t.F_NEEDS_CSUM,
        t.GSO_TCPV4 if version == 4 else t.GSO_TCPV6,
        l3 + 32,
        1000,
        l3,
        16,
    )
    assert frames_to_packets(frames) == segs  # cut again: exactly the segments, PSH on the last only


def test_what_may_not_join_a_run_is_written_alone_and_each_flow_keeps_its_order() -> None:
    a = [tcp(4, b"a" * 1000, seq=1000 * i, ident=i) for i in range(1, 4)]
    b = [tcp(4, b"b" * 1000, seq=1000 * i, sport=40001, ident=i) for i in range(1, 4)]
    ack = tcp(4, b"", seq=4000)  # a pure ACK of flow a: ends a's run
    gap = tcp(4, b"a" * 1000, seq=9000)  # not the next sequence number
    syn = tcp(4, b"", seq=1, flags="S", sport=40002)
    udp = bytes(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=1, dport=2) / b"u")
    bigger = tcp(4, b"a" * 1200, seq=10000)  # larger than the run's segment size
    order = [a[0], b[0], a[1], udp, b[1], a[2], ack, b[2], syn, gap, bigger]
    frames = t.coalesce(order)
    counts = [f[1] for f in frames]
    assert sum(counts) == len(order) and max(counts) == 3
    got = frames_to_packets(frames)
    assert sorted(got) == sorted(order)
    for flow in ([*a, ack, gap, bigger], b):
        assert [p for p in got if p in flow] == [p for p in order if p in flow]


def test_a_run_ends_at_64_segments() -> None:
    segs = [tcp(4, b"x" * 100, seq=100 * i, ident=i) for i in range(130)]
    assert [f[1] for f in t.coalesce(segs)] == [64, 64, 2]


# --- UDP GSO and GRO on loopback ----------------------------------------------------------------


def esp_in_udp(payload: bytes, dport: int, tos: int = 0) -> bytes:
    """A packet as the datapath hands it to the outer port: IPv4 + UDP + payload."""
    return bytes(IP(src="127.0.0.1", dst="127.0.0.1", tos=tos) / UDP(sport=4500, dport=dport) / payload)


def read_all(port: UdpEncapPort, want: int, timeout: float = 3.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += port.read_batch(256)
        if len(got) < want:
            time.sleep(0.01)
    return got


def test_udp_gso_and_gro_carry_exactly_the_datagrams() -> None:
    a = UdpEncapPort("127.0.0.1", 0, offloads=True)
    b = UdpEncapPort("127.0.0.1", 0, offloads=True)
    try:
        payloads = [bytes([i]) * 1200 for i in range(40)] + [b"short"]
        payloads += [bytes([200 + i]) * 300 for i in range(3)]
        pkts = [esp_in_udp(p, b.port) for p in payloads]
        pkts.insert(10, esp_in_udp(b"tos" * 400, b.port, tos=0x10))  # another TOS: a run of its own
        assert a.write_batch(pkts) == len(pkts)
        assert a.gso and a.stats.tx_super >= 2 and a.stats.tx_packets == len(pkts)
        got = read_all(b, len(pkts))
        assert [g[28:] for g in got] == [p[28:] for p in pkts]  # (raw bytes: scapy may dissect 4500 as ESP)
        assert all(IP(g).sport == a.port and IP(g).dport == b.port for g in got)
        assert [IP(g).tos for g in got].count(0x10) == 1
        if b.gro:
            assert b.stats.rx_super >= 1 and b.stats.rx_packets == len(pkts)
    finally:
        a.close()
        b.close()


def test_without_offloads_every_datagram_is_one_system_call() -> None:
    a = UdpEncapPort("127.0.0.1", 0)
    b = UdpEncapPort("127.0.0.1", 0)
    try:
        pkts = [esp_in_udp(bytes([i]) * 500, b.port) for i in range(10)]
        assert a.write_batch(pkts) == 10
        got = read_all(b, 10)
        assert [g[28:] for g in got] == [p[28:] for p in pkts]
        assert a.stats.tx_super == 0 and b.stats.rx_super == 0 and not a.gso and not b.gro
    finally:
        a.close()
        b.close()


def test_a_run_to_a_closed_port_is_counted_not_raised() -> None:
    a = UdpEncapPort("127.0.0.1", 0, offloads=True)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        pkts = [esp_in_udp(b"x" * 100, dead) for _ in range(5)]
        sent = a.write_batch(pkts) + a.write_batch(pkts)  # the second may see ECONNREFUSED: dropped
        assert sent + a.stats.tx_dropped == 10
        assert a.write_batch([b"\x45junk"]) == 0 and a.stats.tx_dropped >= 1
    finally:
        a.close()
