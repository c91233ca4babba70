"""IkeManager's outputs: ``datagrams()`` and ``events()`` hand over what the inputs settled and change
nothing; an input settles only the IKE SAs that produced something (the ready set); the timer heap
follows the SAs' timers."""

from __future__ import annotations

import pytest

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import IkeSa, IkeUp, ReauthDue
from tests.ike.helpers import A, B, ike_config, pump_managers


def _pair(n: int = 1, reauth: float | None = None, dpd: float | None = None) -> tuple[IkeManager, IkeManager]:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    cfg_a.reauth_time = reauth
    cfg_a.dpd_delay = dpd
    cfg_b.unique = "never"  # n IKE SAs of the same peer stay side by side
    a, b = IkeManager([cfg_a], seeded_rng(3)), IkeManager([cfg_b], seeded_rng(4))
    for i in range(n):
        a.initiate("conn", float(i) / 1000)
        pump_managers(a, b, float(i) / 1000)
    assert len(a.sas) == len(b.sas) == n and all(sa.established for sa in a.sas.values())
    return a, b


def test_the_inputs_act_and_the_outputs_only_report() -> None:
    a, _b = _pair(reauth=100.0)
    (old,) = a.sas.values()
    assert old.reauth_at is not None
    a.handle_timer(old.reauth_at)
    # the ReauthDue was acted on by the input: the new IKE SA exists and its IKE_SA_INIT is queued ...
    assert len(a.sas) == 2 and a.stats["reauths_started"] == 1
    sas = dict(a.sas)
    # ... before anything was collected; collecting changes nothing, and a second collection is empty
    evs, dgs = a.events(), a.datagrams()
    assert [type(e) for e in evs] == [ReauthDue] and len(dgs) == 1
    assert a.events() == [] and a.datagrams() == [] and a.sas == sas


def test_an_input_touches_only_the_ike_sas_with_work(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _pair(n=40, dpd=30.0)
    collected: list[IkeSa] = []
    original = IkeSa.datagrams

    def counting(self: IkeSa) -> list[object]:
        collected.append(self)
        return original(self)  # type: ignore[return-value]

    monkeypatch.setattr(IkeSa, "datagrams", counting)
    one = next(iter(a.sas.values()))
    # DPD from one of A's 40 IKE SAs: B settles that one SA, not all 40, for the request and for its outputs
    when = one.last_heard + 30.0
    one.handle_timer(when)
    (dpd,) = one.datagrams()
    collected.clear()
    b.receive(dpd.data, A, dpd.src_port, dpd.dst_port, when)
    (answer,) = b.datagrams()
    assert len(collected) == 1 and b.events() == [] and len(b.sas) == 40
    a.receive(answer.data, B, answer.src_port, answer.dst_port, when)
    assert one.stats["dpd_checks"] == 1 and one.established


def test_the_timer_heap_follows_the_ike_sas() -> None:
    a, b = _pair(n=3)
    want = min(t for sa in a.sas.values() if (t := sa.get_timer()) is not None)
    assert a.get_timer() == want
    # a deleted SA's timers go with it; the next one is then the earliest
    first = next(iter(a.sas.values()))
    a.delete(first, 1.0)
    evs_a, _ = pump_managers(a, b, 1.0)
    assert first.state == "closed" and first not in a.sas.values()
    rest = [t for sa in a.sas.values() if (t := sa.get_timer()) is not None]
    assert a.get_timer() == min(rest)
    assert not any(isinstance(e, IkeUp) for e in evs_a)


def test_a_timer_runs_only_the_ike_sas_that_are_due(monkeypatch: pytest.MonkeyPatch) -> None:
    a, _b = _pair(n=40, dpd=30.0)
    ran: list[IkeSa] = []
    original = IkeSa.handle_timer

    def counting(self: IkeSa, now: float) -> None:
        ran.append(self)
        original(self, now)

    read: list[IkeSa] = []
    get_timer = IkeSa.get_timer

    def reading(self: IkeSa) -> float | None:
        read.append(self)
        return get_timer(self)

    # A's 40 IKE SAs came up a millisecond apart: at the first one's DPD time only it is due
    first = min(a.sas.values(), key=lambda sa: sa.get_timer() or 1e9)
    when = a.get_timer()
    assert when is not None and when == first.get_timer()
    monkeypatch.setattr(IkeSa, "handle_timer", counting)
    monkeypatch.setattr(IkeSa, "get_timer", reading)
    a.handle_timer(when)
    # run, and asked for its next time: that SA alone, not the 39 others
    assert ran == [first] and set(read) == {first} and first.stats["dpd_checks"] == 1
    monkeypatch.undo()
    # ... and the heap holds its next time (the check's retransmission) beside the 39 others
    assert a.get_timer() == min(t for sa in a.sas.values() if (t := sa.get_timer()) is not None)


def test_rekey_on_demand_starts_the_exchange_and_refuses_what_it_cannot() -> None:
    a, b = _pair()
    (sa,) = a.sas.values()
    assert a.rekey(sa, 5.0, sa.children[0].spi_out)  # a child, by either SPI (swanctl --rekey --child)
    assert sa.stats["child_rekeys_started"] == 1 and sa.stats.get("child_rekeys") is None  # the request is out
    assert not a.rekey(sa, 5.0, 0x12345678)  # no such child
    pump_managers(a, b, 5.0)
    assert sa.stats["child_rekeys"] == 1
    assert a.rekey(sa, 6.0)  # the IKE SA itself (swanctl --rekey --ike)
    pump_managers(a, b, 6.0)
    (new,) = a.sas.values()
    assert new is not sa and new.established and sa.state == "closed"
    assert not a.rekey(sa, 7.0)  # a closed IKE SA cannot be rekeyed
