"""Sans-IO: a higher IKE major version is dropped and a request answered with INVALID_MAJOR_VERSION (RFC 7296 §2.5)."""

from __future__ import annotations

import struct

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike.const import Exchange, Notify, Payload
from ipsecstack.ike.manager import MAJOR_VERSION_BURST, MAJOR_VERSION_RATE, IkeManager
from tests.ike.helpers import A, B, ike_config


def _responder() -> IkeManager:
    return IkeManager([ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")], seeded_rng(60))


def _v3_init_request() -> bytes:
    """A real IKE_SA_INIT request from our initiator, its header saying version 3.0 (as ike-scan probes)."""
    a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(61))
    a.initiate("conn", 0.0)
    data = a.datagrams()[0].data
    assert data[17] == 0x20
    return data[:17] + b"\x30" + data[18:]


def test_a_version_3_request_gets_invalid_major_version_in_a_2_0_header() -> None:
    b = _responder()
    req = _v3_init_request()
    b.receive(req, A, 500, 500, 5.0)
    (d,) = b.datagrams()
    assert (d.dst, d.dst_port, d.src_port) == (A, 500, 500)
    spi_i, spi_r, first, version, exchange, flags, mid, length = m.decode_header(d.data)
    assert spi_i == req[:8] and spi_r == bytes(8)  # §1.5: the request's SPIs (SPIr still zero in IKE_SA_INIT)
    assert (first, version, exchange, flags, mid, length) == (Payload.NOTIFY, 0x20, Exchange.IKE_SA_INIT, 0x20, 0, 36)
    # exactly one Notify: no next payload, not critical, length 8, protocol 0, no SPI, type 5, no data
    assert d.data[28:] == struct.pack("!BBHBBH", 0, 0, 8, 0, 0, Notify.INVALID_MAJOR_VERSION)
    assert m.decode(d.data).payloads == [m.Notify(Notify.INVALID_MAJOR_VERSION)]
    assert not b.sas and not b.events()  # no state
    assert b.stats == {"dropped_major_version": 1, "invalid_major_version_sent": 1}


def test_other_requests_get_their_spis_exchange_and_message_id_back() -> None:
    b = _responder()
    spi_i, spi_r = bytes(range(1, 9)), bytes(range(11, 19))
    req = struct.pack("!8s8sBBBBII", spi_i, spi_r, 0, 0x41, Exchange.INFORMATIONAL, 0x08, 7, 28)  # version 4.1
    b.receive(req, A, 4500, 4500, 1.0)
    (d,) = b.datagrams()
    assert d.dst_port == 4500 and d.src_port == 4500
    assert m.decode_header(d.data) == (spi_i, spi_r, Payload.NOTIFY, 0x20, Exchange.INFORMATIONAL, 0x20, 7, 36)


def test_responses_and_broken_lengths_get_no_answer() -> None:
    b = _responder()
    req = _v3_init_request()
    response = req[:19] + bytes([req[19] | 0x20]) + req[20:]  # the Response flag: §2.21.1, never answer one
    b.receive(response, A, 500, 500, 1.0)
    b.receive(req + b"\x00", A, 500, 500, 1.0)  # header length is not the datagram's
    assert b.datagrams() == []
    assert b.stats == {"dropped_major_version": 2}


def test_answers_are_rate_limited() -> None:
    b = _responder()
    req = _v3_init_request()
    for _ in range(100):
        b.receive(req, A, 500, 500, 10.0)
    assert len(b.datagrams()) == MAJOR_VERSION_BURST
    for _ in range(100):
        b.receive(req, A, 500, 500, 13.0)  # 3 s later: the bucket refilled by 3 s x the rate
    assert len(b.datagrams()) == int(3 * MAJOR_VERSION_RATE)
    for _ in range(100):
        b.receive(req, A, 500, 500, 1000.0)  # a long pause refills it only up to the burst
    assert len(b.datagrams()) == MAJOR_VERSION_BURST
    sent = 2 * MAJOR_VERSION_BURST + int(3 * MAJOR_VERSION_RATE)
    assert b.stats == {"dropped_major_version": 300, "invalid_major_version_sent": sent,
                       "invalid_major_version_limited": 300 - sent}  # fmt: skip
    assert not b.sas


def test_version_2_still_works_next_to_the_answers() -> None:
    b = _responder()
    b.receive(_v3_init_request(), A, 500, 500, 1.0)
    a = IkeManager([ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")], seeded_rng(62))
    a.initiate("conn", 1.0)
    b.receive(a.datagrams()[0].data, A, 500, 500, 1.0)
    assert len(b.datagrams()) == 2 and len(b.sas) == 1  # the INVALID_MAJOR_VERSION answer, then the 2.0 response
