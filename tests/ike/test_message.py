"""IKEv2 codec: round trips, scapy's IKEv2 layer as an independent reader, and malformed input."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib import ikev2 as sc

from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Flag, Notify, Payload, Protocol, TransformType


def _init_request() -> m.Message:
    sa = m.SA([
        m.Proposal(1, Protocol.IKE, b"", [
            m.Transform(TransformType.ENCR, 20, 128),
            m.Transform(TransformType.PRF, 5),
            m.Transform(TransformType.DH, 31),
        ]),
        m.Proposal(2, Protocol.IKE, b"", [
            m.Transform(TransformType.ENCR, 12, 256),
            m.Transform(TransformType.INTEG, 12),
            m.Transform(TransformType.PRF, 5),
            m.Transform(TransformType.DH, 14),
        ]),
    ])  # fmt: skip
    return m.Message(
        os.urandom(8), bytes(8), Exchange.IKE_SA_INIT, Flag.INITIATOR, 0,
        [sa, m.KE(31, os.urandom(32)), m.Nonce(os.urandom(32)),
         m.Notify(Notify.NAT_DETECTION_SOURCE_IP, os.urandom(20)),
         m.Notify(Notify.NAT_DETECTION_DESTINATION_IP, os.urandom(20)),
         m.Vendor(b"ipsecstack")],
    )  # fmt: skip


def test_round_trip_init() -> None:
    msg = _init_request()
    data = msg.encode()
    back = m.decode(data)
    assert back == msg
    assert back.encode() == data


def test_scapy_reads_what_we_write() -> None:
    msg = _init_request()
    pkt = sc.IKEv2(msg.encode())
    assert pkt.init_SPI == msg.spi_i and pkt.exch_type == 34 and pkt.flags == 0x08
    sa = pkt[sc.IKEv2_SA]
    props = sa.prop
    assert props.proposal == 1 and props.trans_nb == 3
    assert pkt[sc.IKEv2_KE].group == 31
    assert pkt[sc.IKEv2_Nonce].nonce == msg.payloads[2].data  # type: ignore[union-attr]
    types = [n.type for n in pkt.iterpayloads() if isinstance(n, sc.IKEv2_Notify)]
    assert types == [16388, 16389]


def test_we_read_what_scapy_writes() -> None:
    ts = sc.IKEv2_TSi(traffic_selector=[sc.IPv4TrafficSelector(starting_address_v4="10.1.0.0",
                                                              ending_address_v4="10.1.255.255", IP_protocol_ID=6,
                                                              start_port=0, end_port=65535)])  # fmt: skip
    pkt = sc.IKEv2(init_SPI=b"A" * 8, resp_SPI=b"B" * 8, exch_type=35, flags=0x20, id=1) / ts
    pkt[sc.IKEv2].next_payload = 44
    msg = m.decode(bytes(pkt))
    (tsp,) = msg.payloads
    assert isinstance(tsp, m.TS)
    sel = tsp.selectors[0]
    assert (sel.ts_type, sel.ip_proto, sel.start_addr, sel.end_addr) == (
        7,
        6,
        bytes([10, 1, 0, 0]),
        bytes([10, 1, 255, 255]),
    )
    assert msg.is_response and msg.message_id == 1


def test_every_payload_round_trips() -> None:
    payloads: list[m.AnyPayload] = [
        m.Identification(2, b"gw.example", True),
        m.Certificate(4, b"\x30\x82", request=True),
        m.Auth(2, os.urandom(32)),
        m.Notify(Notify.USE_TRANSPORT_MODE),
        m.Notify(Notify.REKEY_SA, b"", Protocol.ESP, b"\x00\x00\x10\x01"),
        m.Delete(Protocol.ESP, [b"\x00\x00\x10\x01", b"\x00\x00\x10\x02"]),
        m.TS([m.TrafficSelector(8, 0, 0, 65535, bytes(16), b"\xff" * 16)], initiator=False),
        m.CP(1, [(1, b""), (3, b"")]),
        m.Unknown(99, b"xyz", critical=False),
        m.Encrypted(Payload.IDi, os.urandom(64)),
    ]
    msg = m.Message(b"i" * 8, b"r" * 8, Exchange.IKE_AUTH, Flag.INITIATOR, 1, payloads)
    assert m.decode(msg.encode()) == msg


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:20], "truncated"),
        (lambda d: d[:17] + b"\x10" + d[18:], "bad_version"),
        (lambda d: d + b"\x00", "bad_length"),
        (lambda d: d[:28] + d[28:30] + b"\x00\x02" + d[32:], "bad_length"),
    ],
)
def test_malformed_is_a_parse_error(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(m.ParseError) as e:
        m.decode(mutate(_init_request().encode()))
    assert e.value.reason == reason


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 300), st.binary(max_size=8))
def test_fuzz_never_raises_anything_but_parse_error(noise: bytes, cut: int, insert: bytes) -> None:
    data = _init_request().encode()
    mutated = data[:cut] + insert + data[cut + len(insert) :]
    for candidate in (noise, mutated, data[:28] + noise):
        with contextlib.suppress(m.ParseError):
            m.decode(candidate)
