"""The NFQUEUE netlink codec of the native engine (nfq.c), on crafted buffers; no root needed.

Packet messages as nfnetlink_queue sends them are parsed (id, queue, payload, mark, cap_len), truncated
and garbage datagrams end the walk without a crash, verdicts and the copy-range configuration are built
byte for byte as <linux/netfilter/nfnetlink_queue.h> lays them out, and the parser agrees with a Python
reference on mutated and random input (tests/native/fuzz_nfq.py, bounded here).
"""

from __future__ import annotations

import random
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.native.fuzz_nfq import error_msg, one_input, packet_msg, reference_parse
from tests.native.native_helpers import needs_native

pytestmark = needs_native

IP = bytes.fromhex("4500001c000140004011") + bytes(10) + bytes(8)


def _engine() -> ModuleType:
    from ipsecstack.native import _engine

    return _engine


def test_packet_message_fields() -> None:
    msg = packet_msg(11, 0xDEADBEEF, IP, mark=0x2471)
    assert _engine().nfq_parse(msg) == [("packet", 11, 0xDEADBEEF, IP, 0, 0x2471, 0)]


def test_several_messages_and_kernel_errors_in_one_datagram() -> None:
    dgram = packet_msg(10, 1, IP) + error_msg(2) + error_msg(0) + packet_msg(10, 2, None, cap_len=9000)
    assert _engine().nfq_parse(dgram) == [
        ("packet", 10, 1, IP, 0, None, 0),
        ("error", 2),  # ENOENT: a verdict for an id the kernel no longer held
        ("error", 0),  # an acknowledgement
        ("packet", 10, 2, None, 9000, None, 0),  # no payload, cut short: the thread drops it (truncated)
    ]


def test_unknown_attributes_and_flags_are_skipped() -> None:
    extra = struct.pack("=HH", 8, 0x4000 | 5) + bytes(4)  # NFQA_IFINDEX_INDEV with NLA_F_NET_BYTEORDER
    msg = packet_msg(3, 7, IP, extra=extra)
    assert _engine().nfq_parse(msg) == [("packet", 3, 7, IP, 0, None, 0)]


@pytest.mark.parametrize("cut", [1, 4, 15, 16, 19, 20, 27, 40])
def test_truncated_datagrams_stop_the_walk(cut: int) -> None:
    msg = packet_msg(10, 5, IP)
    got = _engine().nfq_parse(msg[:cut])
    assert got == reference_parse(msg[:cut])
    assert got[-1] == ("malformed",)


def test_attribute_longer_than_its_message_is_a_bad_packet_with_its_id() -> None:
    msg = bytearray(packet_msg(10, 42, IP))
    # the payload attribute (after nlmsghdr 16, nfgenmsg 4, packet header 12) claims 200 bytes more
    struct.pack_into("=H", msg, 32, struct.unpack_from("=H", msg, 32)[0] + 200)
    assert _engine().nfq_parse(bytes(msg)) == [("bad_packet", 10, 42, None, 0, None, 0)]


def test_message_without_packet_header_is_malformed() -> None:
    body = struct.pack("!BBH", 0, 0, 10) + struct.pack("=HH", 8, 10) + IP[:4]
    msg = struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body
    assert _engine().nfq_parse(msg) == [("malformed",)]


def test_other_messages_are_skipped() -> None:
    noop = struct.pack("=IHHII", 16, 1, 0, 0, 0)
    config = struct.pack("=IHHII", 20, (3 << 8) | 2, 0, 0, 0) + bytes(4)
    assert _engine().nfq_parse(noop + config + packet_msg(1, 1, IP)) == [
        ("other",), ("other",), ("packet", 1, 1, IP, 0, None, 0)
    ]  # fmt: skip


def test_verdict_layout() -> None:
    e = _engine()
    raw = e.nfq_build_verdict(10, 0x01020304, 1, b"abcde", 0x2471)
    nlen, ntype, flags = struct.unpack_from("=IHH", raw)
    assert ntype == (3 << 8) | 1 and flags == 1  # NFQNL_MSG_VERDICT, NLM_F_REQUEST, no ACK asked
    assert nlen == 16 + 4 + 12 + 8 + 4 + 5 and len(raw) == 52  # padded to 4
    assert raw[16:20] == bytes([0, 0, 0, 10])  # nfgenmsg: AF_UNSPEC, v0, res_id = queue 10
    assert raw[20:32] == struct.pack("=HH", 12, 2) + struct.pack("!II", 1, 0x01020304)  # NFQA_VERDICT_HDR
    assert raw[32:40] == struct.pack("=HH", 8, 3) + struct.pack("!I", 0x2471)  # NFQA_MARK
    assert raw[40:49] == struct.pack("=HH", 9, 10) + b"abcde" and raw[49:] == bytes(3)  # NFQA_PAYLOAD
    drop = e.nfq_build_verdict(11, 9, 0, None, None)
    assert len(drop) == struct.unpack_from("=I", drop)[0] == 32 and drop[24:32] == struct.pack("!II", 0, 9)


def test_verdict_payload_limit() -> None:
    e = _engine()
    assert len(e.nfq_build_verdict(1, 1, 1, bytes(0xFFFF - 4), None)) == 44 - 8 + 0xFFFF - 4 + 1
    with pytest.raises(ValueError):
        e.nfq_build_verdict(1, 1, 1, bytes(0xFFFF - 3), None)
    with pytest.raises(ValueError):
        e.nfq_build_verdict(70000, 1, 1, None, None)


def test_skb_info_is_read() -> None:
    # a GSO queue's packet (NFQA_CFG_F_GSO): CSUMNOTREADY | GSO
    msg = packet_msg(12, 5, IP, skbinfo=3)
    assert _engine().nfq_parse(msg) == [("packet", 12, 5, IP, 0, None, 3)]


def test_gso_flag_config() -> None:
    raw = _engine().nfq_config_flags(12, 4, 4)
    assert struct.unpack_from("=IHH", raw) == (36, (3 << 8) | 2, 1) and raw[16:20] == bytes([0, 0, 0, 12])
    # NFQA_CFG_MASK then NFQA_CFG_FLAGS, both big-endian: NFQA_CFG_F_GSO
    assert raw[20:36] == struct.pack("=HH", 8, 4) + struct.pack("!I", 4) + struct.pack("=HH", 8, 5) + struct.pack(
        "!I", 4
    )


def test_copy_range_config() -> None:
    raw = _engine().nfq_config_copy(10, 0xFFFF)
    assert struct.unpack_from("=IHH", raw) == (32, (3 << 8) | 2, 1)
    assert raw[20:29] == struct.pack("=HH", 9, 2) + struct.pack("!IB", 0xFFFF, 2)  # NFQA_CFG_PARAMS, COPY_PACKET


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=400))
def test_parser_agrees_with_reference(data: bytes) -> None:
    one_input(data)


def test_parser_agrees_on_seeded_random_inputs() -> None:
    rnd = random.Random(20251010)
    for _ in range(3000):
        one_input(rnd.randbytes(rnd.randrange(1, 400)))


def _reference_sum(data: bytes, start: int) -> int:
    s = start
    padded = data + b"\0" * (len(data) & 1)
    for i in range(0, len(padded), 2):
        s += padded[i] << 8 | padded[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFFFFF), st.integers(0, 7))
def test_checksum_sum_matches_rfc1071(data: bytes, start: int, offset: int) -> None:
    # every length and alignment (the native sum loads 8 bytes at a time from wherever the data starts)
    buf = memoryview(bytes(offset) + data)[offset:]
    assert _engine().inet_sum(buf, start) == _reference_sum(data, start)


def test_checksum_sum_of_a_super_packet() -> None:
    rnd = random.Random(7)
    for n in (65535, 65536, 1 << 20 | 3):
        data = rnd.randbytes(n)
        assert _engine().inet_sum(data) == _reference_sum(data, 0)


def test_nfq_start_refuses_raw_esp_without_the_inject_tun_and_sockets_of_the_wrong_kind() -> None:
    """nfq_start's raw-ESP arguments are checked before anything starts (pynfq.c): esp4/esp6 and inject
    go together, and esp4 must be a raw IPPROTO_ESP socket of its family."""
    import socket

    from ipsecstack import native

    eng = native.Engine()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="is not an IPPROTO_ESP socket"):
            eng.nfq_start([], esp4=udp.fileno(), inject=udp.fileno())
        with pytest.raises(ValueError, match="go together"):
            eng.nfq_start([], inject=udp.fileno())
    finally:
        udp.close()
