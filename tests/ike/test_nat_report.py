"""What NAT detection found (RFC 7296 §2.23) is reported apart from encapsulation forced by config.

Before, ``nat`` was true whenever ESP went in UDP, so two directly connected daemons with
``outer_backend = "udp"`` (which fakes the source hash to force encapsulation) logged ``"nat": true``.
"""

from __future__ import annotations

from ipsecstack.ike import nat
from tests.ike.helpers import A, B, Wire, ike_config


def _wire(encap_i: bool = False, nat: bool = False) -> Wire:
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.i.cfg.encap = encap_i
    if nat:
        w.src_seen_by_r = "198.51.100.7"  # a NAT rewrote the initiator's address
        w.cfg_r.remote_addr = None
    w.run()
    assert w.i.established and w.r is not None and w.r.established
    return w


def test_no_nat_reports_nothing() -> None:
    w = _wire()
    assert w.r is not None
    for sa in (w.i, w.r):
        assert nat.report(sa) == {"nat_local": False, "nat_remote": False, "encap_forced": False, "encap": False}


def test_forced_encapsulation_is_not_a_nat() -> None:
    w = _wire(encap_i=True)
    assert w.r is not None
    # the side that forces it knows it faked its hash; it found no NAT
    assert nat.report(w.i) == {"nat_local": False, "nat_remote": False, "encap_forced": True, "encap": True}
    # the peer cannot tell a faked hash from a NAT in front of the initiator (as strongSwan: nat-remote)
    assert nat.report(w.r) == {"nat_local": False, "nat_remote": True, "encap_forced": False, "encap": True}


def test_a_real_nat_is_reported_on_both_sides() -> None:
    w = _wire(nat=True)
    assert w.r is not None
    assert nat.report(w.i) == {"nat_local": True, "nat_remote": False, "encap_forced": False, "encap": True}
    assert nat.report(w.r) == {"nat_local": False, "nat_remote": True, "encap_forced": False, "encap": True}
