"""Sans-IO: ``reauth_time``, make-before-break reauthentication (RFC 7296 §2.8.3, strongSwan's default).

Two IkeManagers back to back with a fake clock: at ``reauth_time`` (minus jitter) the configured side
starts a new IKE SA (IKE_SA_INIT + IKE_AUTH, no INITIAL_CONTACT) with the same children, and only once
those are up deletes the old IKE SA, on both sides with cause ``"reauth"`` (no close action).
"""

from __future__ import annotations

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike.const import Protocol
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.model import REAUTH_RETRY_DELAY, REAUTH_TRIES
from ipsecstack.ike.session import (
    ChildConfig,
    ChildDown,
    ChildUp,
    IkeDown,
    IkeReauthed,
    IkeRekeyed,
    IkeSa,
    IkeUp,
    PeerConfig,
    ReauthDue,
    ReauthFailed,
)
from ipsecstack.runtime import actions
from tests.ike.helpers import A, B, ike_config, ts_range


def _run(a: IkeManager, b: IkeManager, now: float) -> tuple[list[object], list[object]]:
    """Like the runtime's pump: move datagrams both ways and collect events until nothing happens."""
    ev_a: list[object] = []
    ev_b: list[object] = []
    for _ in range(50):
        new_a, new_b = a.events(), b.events()
        ev_a += new_a
        ev_b += new_b
        moved = False
        for d in a.datagrams():
            moved = True
            b.receive(d.data, A, d.src_port, d.dst_port, now)
        for d in b.datagrams():
            moved = True
            a.receive(d.data, B, d.src_port, d.dst_port, now)
        if not moved and not new_a and not new_b:
            return ev_a, ev_b
    raise AssertionError("the exchange did not settle")


def _pair(reauth: float | None, *, seed: int = 1, two_children: bool = False,
          rekey: float | None = None) -> tuple[IkeManager, IkeManager, PeerConfig, PeerConfig]:  # fmt: skip
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    cfg_a.reauth_time = reauth
    cfg_a.rekey_time = cfg_b.rekey_time = rekey
    for c in cfg_a.children + cfg_b.children:
        c.rekey_time = None  # no child rekeys in the way (their timers are tested elsewhere)
    if two_children:
        esp = [props.parse("aes128gcm16", Protocol.ESP)]
        cfg_a.children.append(
            ChildConfig("dmz", [ts_range("10.11.0.0/16")], [ts_range("10.12.0.0/16")], esp, rekey_time=None)
        )
        cfg_b.children.append(
            ChildConfig("dmz", [ts_range("10.12.0.0/16")], [ts_range("10.11.0.0/16")], esp, rekey_time=None)
        )
    a, b = IkeManager([cfg_a], seeded_rng(seed)), IkeManager([cfg_b], seeded_rng(seed + 500))
    a.initiate("conn", 0.0)
    _run(a, b, 0.0)
    return a, b, cfg_a, cfg_b


def _fire(a: IkeManager, b: IkeManager, t: float) -> tuple[list[object], list[object]]:
    a.handle_timer(t)
    b.handle_timer(t)
    return _run(a, b, t)


def _names(evs: list[object]) -> list[str]:
    return [type(e).__name__ for e in evs]


def test_reauth_is_due_at_reauth_time_minus_jitter() -> None:
    times = []
    for seed in range(1, 25):
        a, _b, _, _ = _pair(100.0, seed=seed)
        (sa,) = a.sas.values()
        assert sa.reauth_at is not None and 90.0 <= sa.reauth_at <= 100.0  # rekey_jitter 10%, drawn from the rng
        assert a.get_timer() == sa.reauth_at
        times.append(sa.reauth_at)
    assert len(set(times)) > 20  # random, not a constant offset
    a, b, _, _ = _pair(100.0, seed=3)
    (old,) = a.sas.values()
    t = old.reauth_at
    assert t is not None
    ev_a, _ = _fire(a, b, t - 0.01)
    assert not any(isinstance(e, ReauthDue) for e in ev_a) and list(a.sas.values()) == [old]
    ev_a, _ = _fire(a, b, t)
    assert [e.sa for e in ev_a if isinstance(e, ReauthDue)] == [old]


def test_no_reauthentication_when_reauth_time_is_off() -> None:
    a, b, _, _ = _pair(None)
    (sa_a,) = a.sas.values()
    (sa_b,) = b.sas.values()
    assert sa_a.reauth_at is None and sa_b.reauth_at is None and a.get_timer() is None
    for t in (100.0, 10_000.0, 1e6):
        ev_a, ev_b = _fire(a, b, t)
        assert ev_a == [] and ev_b == []
    assert list(a.sas.values()) == [sa_a] and sa_a.established and "reauths_started" not in a.stats


def test_make_before_break_reauthentication() -> None:
    a, b, _, _ = _pair(100.0, two_children=True)
    (old_a,) = a.sas.values()
    (old_b,) = b.sas.values()
    assert sorted(c.child.name for c in old_a.children) == ["dmz", "net"]
    old_spis = {(c.spi_in, c.spi_out) for c in old_a.children}
    t = old_a.reauth_at
    assert t is not None
    ev_a, ev_b = _fire(a, b, t)
    # a new IKE SA with both children first, then the old one goes: never a moment without child SAs
    assert _names(ev_a) == ["ReauthDue", "IkeUp", "ChildUp", "ChildUp", "IkeReauthed", "ChildDown", "ChildDown",
                            "IkeDown"], ev_a  # fmt: skip
    (new_a,) = a.sas.values()
    (new_b,) = b.sas.values()
    assert new_a is not old_a and new_b is not old_b and old_a.state == old_b.state == "closed"
    assert (new_a.spi_i, new_a.spi_r) == (new_b.spi_i, new_b.spi_r) and new_a.spi_i != old_a.spi_i
    assert new_a.initiator and new_a.keys is not None and old_a.keys is not None
    assert new_a.keys.sk_d != old_a.keys.sk_d  # fresh IKE_SA_INIT: not derived from the old SA (no rekey)
    (done,) = [e for e in ev_a if isinstance(e, IkeReauthed)]
    assert (done.old, done.new) == (old_a, new_a)
    assert sorted(c.child.name for c in new_a.children) == ["dmz", "net"]
    assert not {(c.spi_in, c.spi_out) for c in new_a.children} & old_spis
    # RFC 7296 §2.4: the new IKE SA did not say INITIAL_CONTACT (that would make a unique = no peer drop the old)
    assert not new_b.initial_contact
    # the old SA's children go with cause "ike", the old IKE SA with "reauth" on both sides: no close action
    for evs, old in ((ev_a, old_a), (ev_b, old_b)):
        downs = [e for e in evs if isinstance(e, IkeDown)]
        assert [(d.sa, d.cause) for d in downs] == [(old, "reauth")], downs
        assert {e.cause for e in evs if isinstance(e, ChildDown)} == {"ike"}
        assert not actions.after_ike_down(old, "reauth", True)
        first_down = next(i for i, e in enumerate(evs) if isinstance(e, ChildDown))
        assert sum(isinstance(e, ChildUp) for e in evs[:first_down]) == 2
    assert _names(ev_b).count("ChildUp") == 2 and not any(isinstance(e, IkeReauthed) for e in ev_b)
    # the new SA reauthenticates again reauth_time after it came up
    assert new_a.reauth_at is not None and t + 90.0 <= new_a.reauth_at <= t + 100.0
    assert a.stats["reauths"] == 1 and new_b.reauth_at is None  # only the configured side reauthenticates


def test_the_peer_close_action_does_not_apply() -> None:
    a, b, _, cfg_b = _pair(100.0)
    cfg_b.children[0].close_action = "trap"  # would arm traps if B took the old SA's deletion as a close
    (old_b,) = b.sas.values()
    (old_a,) = a.sas.values()
    assert old_a.reauth_at is not None
    _, ev_b = _fire(a, b, old_a.reauth_at)
    (down,) = [e for e in ev_b if isinstance(e, IkeDown)]
    assert down.sa is old_b and down.cause == "reauth"
    assert not actions.after_ike_down(old_b, down.cause, False)
    assert actions.after_ike_down(old_b, "peer", False) == actions.Reaction(trap=["net"])  # the difference


def test_rekey_and_reauth_timers_are_independent() -> None:
    a, b, _, _ = _pair(100.0, rekey=40.0)
    (first,) = a.sas.values()
    reauth_at, rekey_at = first.reauth_at, first.rekey_at
    assert reauth_at is not None and rekey_at is not None and rekey_at < 40.0 < 90.0 <= reauth_at
    ev_a, _ = _fire(a, b, rekey_at)
    assert any(isinstance(e, IkeRekeyed) for e in ev_a) and not any(isinstance(e, ReauthDue) for e in ev_a)
    (rekeyed,) = a.sas.values()
    # a rekey is no reauthentication: the reauth time stands (strongSwan keeps it too)
    assert rekeyed is not first and rekeyed.reauth_at == reauth_at and first.reauth_at is None
    t = rekeyed.rekey_at
    assert t is not None and t < reauth_at  # rekeyed again before the reauthentication
    _fire(a, b, t)
    (rekeyed,) = a.sas.values()
    assert rekeyed.reauth_at == reauth_at
    ev_a, _ev_b = _fire(a, b, reauth_at)
    assert [type(e) for e in ev_a if isinstance(e, ReauthDue | IkeReauthed)] == [ReauthDue, IkeReauthed]
    (new,) = a.sas.values()
    assert new is not rekeyed and rekeyed.state == "closed" and len(new.children) == 1
    assert new.rekey_at is not None and reauth_at < new.rekey_at <= reauth_at + 40.0  # its own rekey timer


def test_failed_reauthentication_keeps_the_old_sa_and_retries_a_bounded_number_of_times() -> None:
    a, b, _, cfg_b = _pair(100.0)
    cfg_b.unique = "keep"  # B refuses a second IKE SA of the same peer: every reauthentication fails
    (old_a,) = a.sas.values()
    (old_b,) = b.sas.values()
    children = list(old_a.children)
    t = old_a.reauth_at
    assert t is not None
    retries = []
    for _ in range(REAUTH_TRIES):
        ev_a, ev_b = _fire(a, b, t)
        assert [type(e) for e in ev_a if isinstance(e, ReauthDue | IkeUp)] == [ReauthDue]
        (failed,) = [e for e in ev_a if isinstance(e, ReauthFailed)]
        assert failed.sa is old_a and "AUTHENTICATION_FAILED" in failed.reason
        assert [e.cause for e in ev_a if isinstance(e, IkeDown)] == ["failed"]  # only the new one went
        assert not any(isinstance(e, ChildDown) for e in ev_a + ev_b)
        assert list(a.sas.values()) == [old_a] and list(b.sas.values()) == [old_b] and old_a.children == children
        retries.append(failed.retry_at)
        if failed.retry_at is None:
            break
        assert failed.retry_at == t + REAUTH_RETRY_DELAY
        t = failed.retry_at
    assert retries[-1] is None and len(retries) == REAUTH_TRIES  # then it stays until it expires or is deleted
    assert old_a.reauth_at is None and old_a.established and a.get_timer() is None


def test_a_retry_succeeds_once_the_peer_accepts() -> None:
    a, b, _, cfg_b = _pair(100.0)
    cfg_b.unique = "keep"
    (old_a,) = a.sas.values()
    assert old_a.reauth_at is not None
    ev_a, _ = _fire(a, b, old_a.reauth_at)
    (failed,) = [e for e in ev_a if isinstance(e, ReauthFailed)]
    assert failed.retry_at is not None
    cfg_b.unique = "no"
    ev_a, _ev_b = _fire(a, b, failed.retry_at)
    assert any(isinstance(e, IkeReauthed) for e in ev_a) and old_a.state == "closed"
    assert len(a.sas) == len(b.sas) == 1 and next(iter(a.sas.values())).children


def test_the_new_sa_is_deleted_when_a_child_cannot_be_negotiated() -> None:
    a, b, _, cfg_b = _pair(100.0)
    (old_a,) = a.sas.values()
    cfg_b.children[0].remote_ts = [ts_range("10.99.0.0/16")]  # B now refuses the child: TS_UNACCEPTABLE
    assert old_a.reauth_at is not None
    ev_a, _ev_b = _fire(a, b, old_a.reauth_at)
    (failed,) = [e for e in ev_a if isinstance(e, ReauthFailed)]
    assert "net not negotiated" in failed.reason and "TS_UNACCEPTABLE" in failed.reason
    assert list(a.sas.values()) == [old_a] and old_a.established and len(old_a.children) == 1
    assert len(b.sas) == 1 and next(iter(b.sas.values())).children  # B dropped the new IKE SA, kept the old


def test_initial_contact_is_absent_on_the_wire() -> None:
    a, b, _, _ = _pair(100.0)
    (old_a,) = a.sas.values()
    t = old_a.reauth_at
    assert t is not None
    a.handle_timer(t)
    a.events()  # the manager starts the new IKE SA
    new = next(sa for sa in a.sas.values() if sa is not old_a)
    assert isinstance(new, IkeSa) and not new.send_initial_contact and old_a.send_initial_contact
    (init,) = a.datagrams()
    assert m.decode(init.data).exchange == 34 and m.decode(init.data).spi_r == bytes(8)
    b.receive(init.data, A, init.src_port, init.dst_port, t)
    for d in b.datagrams():
        a.receive(d.data, B, d.src_port, d.dst_port, t)
    (auth,) = a.datagrams()
    b.receive(auth.data, A, auth.src_port, auth.dst_port, t)
    new_b = next(sa for sa in b.sas.values() if sa.spi_i == new.spi_i)
    old_b = next(sa for sa in b.sas.values() if sa.spi_i == old_a.spi_i)
    assert new_b.established and not new_b.initial_contact and old_b.initial_contact
