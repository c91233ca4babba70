"""RFC 7296 §2.8 in the core: the responder of a child rekey holds the new outbound SA back until the
initiator surely has the pair (traffic on the new inbound SA, the old SA's delete, or a deadline), and
says so with OutboundReady; the runtime only installs what the events say."""

from __future__ import annotations

from ipsecstack.entropy import seeded_rng
from ipsecstack.ike.manager import IkeManager
from ipsecstack.ike.session import ChildDown, ChildUp, OutboundReady
from ipsecstack.ike.tasks.child_common import OUT_HOLD
from tests.ike.helpers import A, B, Wire, ike_config, sa_events


def _rekeyed(deliver_delete: bool) -> Wire:
    """A rekeys its child SA; B answers. The DELETE of the old SA reaches B only if ``deliver_delete``."""
    w = Wire(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"))
    w.run()
    sa_events(w.i), sa_events(w.r)
    assert w.r is not None
    w.i.children[0].rekey_at = 10.0
    w.i.handle_timer(10.0)
    w.to_responder(w.i.datagrams(), 10.0)  # CREATE_CHILD_SA request
    w.to_initiator(w.r.datagrams(), 10.0)  # its response: A installs the pair and sends the DELETE of the old
    delete = w.i.datagrams()
    assert len(delete) == 1
    if deliver_delete:
        w.to_responder(delete, 10.0)
        w.to_initiator(w.r.datagrams(), 10.0)
    return w


def test_the_rekey_responder_holds_its_outbound_sa_until_the_old_one_goes() -> None:
    w = _rekeyed(deliver_delete=True)
    assert w.r is not None
    evs = sa_events(w.r)
    (up,) = [e for e in evs if isinstance(e, ChildUp)]
    assert up.hold_out and up.replaces is not None
    # the new one is ready before the old one goes, so traffic never lacks an outbound SA
    order = [(type(e).__name__, getattr(e, "why", None)) for e in evs if isinstance(e, OutboundReady | ChildDown)]
    assert order == [("OutboundReady", "peer deleted the old SA"), ("ChildDown", None)]
    # the initiator of the rekey sends on the new pair at once
    (up_i,) = [e for e in sa_events(w.i) if isinstance(e, ChildUp)]
    assert not up_i.hold_out


def test_traffic_on_the_new_inbound_sa_releases_it() -> None:
    w = _rekeyed(deliver_delete=False)
    assert w.r is not None
    (up,) = [e for e in sa_events(w.r) if isinstance(e, ChildUp)]
    w.r.inbound_seen(up.replaces or 0, 10.5)  # traffic on the old SA says nothing about the new one
    assert not any(isinstance(e, OutboundReady) for e in sa_events(w.r))
    w.r.inbound_seen(up.spi_in, 10.5)
    assert [(e.spi_in, e.why) for e in sa_events(w.r) if isinstance(e, OutboundReady)] == [
        (up.spi_in, "peer sends on it")
    ]
    w.r.inbound_seen(up.spi_in, 10.6)  # once
    assert sa_events(w.r) == []


def test_without_traffic_or_delete_the_deadline_releases_it() -> None:
    w = _rekeyed(deliver_delete=False)
    assert w.r is not None
    (up,) = [e for e in sa_events(w.r) if isinstance(e, ChildUp)]
    timer = w.r.get_timer()
    assert timer is not None and timer <= 10.0 + OUT_HOLD
    w.r.handle_timer(10.0 + OUT_HOLD - 0.01)
    assert not any(isinstance(e, OutboundReady) for e in sa_events(w.r))
    w.r.handle_timer(10.0 + OUT_HOLD)
    assert [(e.spi_in, e.why) for e in sa_events(w.r) if isinstance(e, OutboundReady)] == [
        (up.spi_in, "no traffic from the peer yet")
    ]


def test_the_manager_routes_inbound_traffic_by_spi() -> None:
    cfg_a = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16")
    cfg_b = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    a, b = IkeManager([cfg_a], seeded_rng(21)), IkeManager([cfg_b], seeded_rng(22))
    a.initiate("conn", 0.0)
    for _ in range(10):
        for d in a.datagrams():
            b.receive(d.data, A, d.src_port, d.dst_port, 0.0)
        for d in b.datagrams():
            a.receive(d.data, B, d.src_port, d.dst_port, 0.0)
    (sa_b,) = b.sas.values()
    spi = sa_b.children[0].spi_in
    b.events()
    b.inbound_seen([spi, 0x12345678], 7.0)  # an unknown SPI is ignored
    assert sa_b.last_heard == 7.0 and b.events() == []
