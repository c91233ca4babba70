"""The datapath's "seen" reports (both engines): the inbound SAs that accepted a packet since they were
installed or re-armed, each once, as the IKE core wants them for DPD (RFC 7296 §2.4) and the §2.8 hold-back."""

from __future__ import annotations

from ipsecstack import Action, Datapath, Policy, SecurityAssociation, Selector, Template
from tests.packets import tcp4

GW_A, GW_B = "192.0.2.1", "192.0.2.2"


def _pair(spi: int, key: bytes = bytes(range(20))) -> tuple[SecurityAssociation, SecurityAssociation]:
    sas = [SecurityAssociation(spi, key=key, tunnel_src=GW_A, tunnel_dst=GW_B, direction=d, reqid=spi)  # type: ignore[arg-type]
           for d in ("out", "in")]  # fmt: skip
    return sas[0], sas[1]


def _peers(*spis: int) -> tuple[Datapath, Datapath]:
    a, b = Datapath(), Datapath()
    for i, spi in enumerate(spis):
        sel = Selector(f"10.1.{i}.0/24", "10.2.0.0/16")
        a.spd.add(Policy(sel, Action.PROTECT, "out", Template(reqid=spi)))
        b.spd.add(Policy(sel, Action.PROTECT, "in", Template(reqid=spi)))
        out, inb = _pair(spi)
        a.install(out, 0.0)
        b.install(inb, 0.0)
    return a, b


def _wire(a: Datapath, subnet: int, n: int = 3) -> list[bytes]:
    return a.outbound([tcp4(src=f"10.1.{subnet}.10") for _ in range(n)], 1.0).to_network


def test_each_sa_is_reported_once_until_rearmed(datapath_engine: str) -> None:
    a, b = _peers(0x100, 0x200)
    assert b.take_seen() == [] and a.take_seen() == []
    first, second = _wire(a, 0), _wire(a, 1)
    assert len(b.inbound(first, 2.0).to_inner) == 3
    assert b.take_seen() == [0x100]
    b.inbound(_wire(a, 0), 2.1)
    assert b.take_seen() == []  # quiet until re-armed, however much arrives
    b.inbound(second, 2.2)
    assert b.take_seen() == [0x200]
    b.rearm_seen([0x100, 0xDEAD])  # an SPI nobody holds is skipped
    b.inbound(_wire(a, 0) + _wire(a, 1), 3.0)
    assert b.take_seen() == [0x100]
    assert a.take_seen() == []  # outbound SAs are never reported


def test_only_packets_the_sa_accepts_count(datapath_engine: str) -> None:
    a, b = _peers(0x300)
    wire = _wire(a, 0, 2)
    forged = bytearray(wire[0])
    forged[-1] ^= 1  # the ICV fails
    replayed = wire[1]
    got = b.inbound([bytes(forged)], 1.0)
    assert got.dropped and b.take_seen() == []
    b.inbound([replayed], 1.1)
    assert b.take_seen() == [0x300]
    b.rearm_seen([0x300])
    assert b.inbound([replayed], 1.2).dropped and b.take_seen() == []  # a replay proves nothing


def test_a_removed_sa_is_forgotten_and_a_reinstalled_one_reports_again(datapath_engine: str) -> None:
    a, b = _peers(0x400)
    (inb,) = [sa for sa in b.sad if sa.direction == "in"]
    b.inbound(_wire(a, 0), 1.0)
    assert b.take_seen() == [0x400]
    b.remove(inb)
    b.rearm_seen([0x400])  # after removal: nothing to do, no error
    b.install(inb, 2.0)
    b.inbound(_wire(a, 0), 2.1)
    assert b.take_seen() == [0x400]
