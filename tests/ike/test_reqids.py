"""Reqids are the sans-IO core's decision (IkeManager): fresh per child, kept by a rekey, shared by a
reauthentication's new child SA with the old one, a trap's when the child has a trap policy."""

from __future__ import annotations

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildDown, ChildUp, IkeSa
from tests.ike.helpers import A, B, ike_config, pump_managers


def _pair(reauth: float | None = None) -> tuple[IkeManager, IkeManager, list[object], list[object]]:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    cfg_a.reauth_time = reauth
    a, b = IkeManager([cfg_a], seeded_rng(11)), IkeManager([cfg_b], seeded_rng(12))
    a.initiate("conn", 0.0)
    ev_a, ev_b = pump_managers(a, b, 0.0)
    return a, b, ev_a, ev_b


def _ups(evs: list[object]) -> list[ChildUp[IkeSa]]:
    return [e for e in evs if isinstance(e, ChildUp)]


def test_a_child_gets_a_fresh_reqid_and_its_record_too() -> None:
    a, _b, ev_a, ev_b = _pair()
    (up_a,), (up_b,) = _ups(ev_a), _ups(ev_b)
    assert up_a.reqid == up_b.reqid == 1
    (sa_a,) = a.sas.values()
    assert [c.reqid for c in sa_a.children] == [1]


def test_a_rekey_keeps_the_reqid_and_a_deleted_child_frees_it() -> None:
    a, b, _, _ = _pair()
    (sa_a,) = a.sas.values()
    assert a.rekey(sa_a, 10.0, sa_a.children[0].spi_in)
    ev_a, ev_b = pump_managers(a, b, 10.0)
    assert [u.reqid for u in _ups(ev_a)] == [u.reqid for u in _ups(ev_b)] == [1]
    assert [type(e) for e in ev_a if isinstance(e, ChildUp | ChildDown)] == [ChildUp, ChildDown]
    # the IKE SA goes with its child: the reqid is free, and the next IKE SA's child gets a new one
    a.delete(sa_a, 20.0)
    pump_managers(a, b, 20.0)
    a.initiate("conn", 30.0)
    ev_a, _ = pump_managers(a, b, 30.0)
    assert [u.reqid for u in _ups(ev_a)] == [2]


def test_a_reauthentication_shares_the_reqid_of_the_children_it_replaces() -> None:
    a, b, _, _ = _pair(reauth=100.0)
    (old,) = a.sas.values()
    t = old.reauth_at
    assert t is not None
    a.handle_timer(t)
    ev_a, ev_b = pump_managers(a, b, t)
    # make-before-break: the new child SA is up on both sides with reqid 1 before the old one goes
    assert [u.reqid for u in _ups(ev_a)] == [u.reqid for u in _ups(ev_b)] == [1]
    assert old.state in ("deleting", "closed")


def test_a_trap_policy_gives_its_reqid() -> None:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    a, b = IkeManager([cfg_a], seeded_rng(13)), IkeManager([cfg_b], seeded_rng(14))
    a.reqids.traps = {("conn", "net"): 1 << 20}
    a.initiate("conn", 0.0)
    ev_a, ev_b = pump_managers(a, b, 0.0)
    assert [u.reqid for u in _ups(ev_a)] == [1 << 20] and [u.reqid for u in _ups(ev_b)] == [1]
