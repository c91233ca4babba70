"""IKE-negotiated AH child SAs (``ah_proposals``; RFC 4302 with RFC 7296 §3.3 protocol ID 2).

Proposal parsing and selection, KEYMAT for AH (§2.17: integrity keys only), the sans-IO sessions
negotiating, rekeying and deleting an AH child, AH refused across a NAT, and the negotiated keys
protecting real packets (checked against scapy's independent AH).

No strongSwan interop here: charon's userspace ``kernel-libipsec`` (the only IPsec backend usable in
the test namespaces) implements ESP only, so AH is tested between two ipsecstack peers.
"""

from __future__ import annotations

import os

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import AH
from scapy.layers.ipsec import SecurityAssociation as ScapySA

from ipsecstack import protect, unprotect
from ipsecstack.errors import ConfigError
from ipsecstack.ike import message as m
from ipsecstack.ike import proposals as props
from ipsecstack.ike import sk
from ipsecstack.ike.const import Exchange, Notify, Protocol, TransformType
from ipsecstack.ike.install import child_objects, trap_policies
from ipsecstack.ike.keymat import PRFS, child_keymat, prf_plus
from ipsecstack.ike.session import ChildConfig, ChildDown, ChildUp, IkeSa, IkeUp, PeerConfig
from ipsecstack.ike.tasks import child_common
from tests.ike.helpers import A, B, Wire, ike_config, sa_events, ts_range
from tests.packets import icmp4, tcp4

SCAPY_AUTH = {"sha256": "SHA2-256-128", "sha384": "SHA2-384-192", "sha512": "SHA2-512-256"}


# --- proposals ----------------------------------------------------------------------------------------


def _types(p: m.Proposal) -> list[tuple[int, int]]:
    return [(t.type, t.id) for t in p.transforms]


def test_parse_ah_proposals_and_their_sa_payload() -> None:
    alg = props.parse("sha256", Protocol.AH)
    assert alg.protocol == Protocol.AH and alg.encr == () and [i.keyword for i in alg.integ] == ["sha256"]
    p = alg.to_payload(1, b"\x00\x00\x12\x34")
    # RFC 7296 §3.3.1: protocol ID 2; AH carries INTEG (+ KE) + ESN, never ENCR or PRF (§3.3.3)
    assert p.protocol == 2 and p.spi == b"\x00\x00\x12\x34"
    assert _types(p) == [(TransformType.INTEG, 12), (TransformType.ESN, 0)]
    pfs = props.parse("sha384-sha512-x25519-esn-noesn", Protocol.AH).to_payload(2, b"\x00\x00\x00\x01")
    assert _types(pfs) == [(3, 13), (3, 14), (4, 31), (5, 1), (5, 0)]
    assert _types(props.parse("sha512", Protocol.AH).without_dh().to_payload(1, b"")) == [(3, 14), (5, 0)]
    # the payload survives the wire codec
    sa = m.SA([p, pfs])
    raw = m.Message(bytes(8), bytes(8), Exchange.CREATE_CHILD_SA, 0, 1, [sa]).encode()
    back = m.decode(raw).payloads[0]
    assert isinstance(back, m.SA) and back.proposals[0].protocol == 2 and _types(back.proposals[1]) == _types(pfs)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("aes128gcm16", "AH authenticates only (RFC 4302): remove aes128gcm16"),
        ("aes256-sha256", "remove aes256"),
        ("x25519-esn", "name an integrity algorithm (sha256, sha384 or sha512)"),
        ("sha256-prfsha256", "take no PRF"),
        ("sha256-md5", "unknown algorithm 'md5'; known: curve25519"),
    ],
)
def test_ah_proposal_errors_name_the_key(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        props.parse(text, Protocol.AH, "connections.c.children.ch.ah_proposals[0]")
    assert e.value.field == "connections.c.children.ch.ah_proposals[0]" and hint in str(e.value), str(e.value)
    if "unknown" in hint:
        assert "aes128gcm16" not in str(e.value)  # AH lists what AH takes


def test_select_and_check_choice_for_ah() -> None:
    ours = [props.parse("sha512-sha256", Protocol.AH)]
    theirs = [props.parse("aes128gcm16", Protocol.ESP).to_payload(1, b"\x00\x00\x00\x07"),
              props.parse("sha256-esn-noesn", Protocol.AH).to_payload(2, b"\x00\x00\x00\x08")]  # fmt: skip
    chosen = props.select(ours, theirs, Protocol.AH)
    assert chosen is not None and chosen.protocol == Protocol.AH and chosen.number == 2
    assert chosen.integ is not None and chosen.integ.keyword == "sha256" and not chosen.esn
    assert chosen.describe() == "sha256" and chosen.child_suite.keyword == "sha256" and chosen.child_suite.key_len == 32
    reply = chosen.to_payload()
    assert reply.protocol == 2 and _types(reply) == [(3, 12), (5, 0)]  # one algorithm per type, no ENCR
    # an ESP child does not take an AH offer, nor the other way round
    assert props.select([props.parse("aes128gcm16", Protocol.ESP)], theirs[1:], Protocol.ESP) is None
    assert props.select(ours, theirs[:1], Protocol.AH) is None
    # an AH proposal with an ENCR transform is not AH (§3.3.3)
    bad = m.Proposal(1, Protocol.AH, b"\x00\x00\x00\x09", [m.Transform(1, 20, 128), m.Transform(3, 12)])
    assert props.select(ours, [bad], Protocol.AH) is None
    # initiator: the reply must be AH, one of ours
    offered = [props.parse("sha256", Protocol.AH)]
    good = m.Proposal(1, Protocol.AH, b"\x00\x00\x00\x0a", [m.Transform(3, 12)])
    got = props.check_choice(offered, good, Protocol.AH)
    assert got is not None and got.spi == b"\x00\x00\x00\x0a" and got.protocol == Protocol.AH
    as_esp = m.Proposal(1, Protocol.ESP, good.spi, good.transforms)
    assert props.check_choice(offered, as_esp, Protocol.AH) is None
    assert props.check_choice(offered, good, Protocol.ESP) is None


# --- KEYMAT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("integ", "key_len"), [("sha256", 32), ("sha384", 48), ("sha512", 64)])
def test_ah_keymat_is_integrity_keys_only(integ: str, key_len: int) -> None:
    """§2.17: for AH, KEYMAT is the initiator->responder integrity key, then the responder->initiator one."""
    prf = PRFS[5]
    sk_d, ni, nr = os.urandom(32), os.urandom(32), os.urandom(32)
    suite = props.parse(integ, Protocol.AH)
    chosen = props.Chosen(Protocol.AH, props.ENCR["null"], suite.integ[0], None, None, False, 1, b"\0\0\0\1")
    assert chosen.child_suite.key_len == key_len
    i2r, r2i = child_keymat(prf, sk_d, ni, nr, key_len)
    assert len(i2r) == len(r2i) == key_len and i2r != r2i
    assert i2r + r2i == prf_plus(prf, sk_d, ni + nr, 2 * key_len)


# --- sessions -----------------------------------------------------------------------------------------


def _ah_cfg(local: str, remote: str, lnet: str, rnet: str, ah: str = "sha256", mode: str = "tunnel") -> PeerConfig:
    cfg = ike_config(local, remote, lnet, rnet, mode=mode)
    cfg.children = [ChildConfig("net", [ts_range(lnet)], [ts_range(rnet)],
                                [props.parse(p, Protocol.AH) for p in ah.split(",")], mode)]  # fmt: skip
    return cfg


def _wire(ah: str = "sha256", mode: str = "tunnel", ah_r: str | None = None) -> Wire:
    return Wire(_ah_cfg(A, B, "10.1.0.0/16", "10.2.0.0/16", ah, mode),
                _ah_cfg(B, A, "10.2.0.0/16", "10.1.0.0/16", ah_r or ah, mode))  # fmt: skip


def _inner(w: Wire, way: str, exchange: int) -> list[list[m.AnyPayload]]:
    """The decrypted payloads of the requests (``i->r``) or responses (``r->i``) of one exchange type."""
    assert w.r is not None
    out = []
    for direction, d in w.log:
        msg = m.decode(d.data)
        if msg.exchange != exchange or direction != way:
            continue
        keys = w.r.rx if way == "i->r" else w.i.rx
        assert keys is not None
        out.append(sk.open_(d.data, msg, keys))
    return out


def _ups(sa: IkeSa | None) -> list[ChildUp]:
    return [e for e in sa_events(sa) if isinstance(e, ChildUp)]


@pytest.mark.parametrize(
    ("ah", "mode", "transform", "esn"),
    [("sha256", "tunnel", "sha256", False), ("sha384", "transport", "sha384", False),
     ("sha512-esn", "tunnel", "sha512", True), ("sha256-x25519", "transport", "sha256", False)],
)  # fmt: skip
def test_ike_auth_negotiates_an_ah_child(ah: str, mode: str, transform: str, esn: bool) -> None:
    w = _wire(ah, mode)
    w.run()
    ev_i, ev_r = sa_events(w.i), sa_events(w.r)
    assert [type(e) for e in ev_i] == [IkeUp, ChildUp] and [type(e) for e in ev_r] == [IkeUp, ChildUp]
    ci, cr = ev_i[1], ev_r[1]
    assert isinstance(ci, ChildUp) and isinstance(cr, ChildUp)
    assert ci.protocol == cr.protocol == "ah" and ci.transform == cr.transform == transform
    assert ci.esn == cr.esn == esn and ci.mode == cr.mode == mode and ci.encap is None
    assert (ci.spi_out, ci.spi_in) == (cr.spi_in, cr.spi_out)
    key_len = props.parse(transform, Protocol.AH).integ[0].key_len
    assert len(ci.key_in) == len(ci.key_out) == key_len and ci.key_in != ci.key_out
    assert ci.key_out == cr.key_in and ci.key_in == cr.key_out
    # on the wire: the IKE_AUTH SA payloads are AH proposals (protocol ID 2) with no ENCR, and no KE (§1.2)
    (req,) = _inner(w, "i->r", Exchange.IKE_AUTH)
    (resp,) = _inner(w, "r->i", Exchange.IKE_AUTH)
    for payloads in (req, resp):
        (sa,) = [p for p in payloads if isinstance(p, m.SA)]
        assert all(p.protocol == Protocol.AH for p in sa.proposals)
        assert all(t.type in (TransformType.INTEG, TransformType.ESN) for p in sa.proposals for t in p.transforms)
    # the datapath objects are AH SAs and AH templates
    inb_i, out_i, pols_i = child_objects(ci, 7)
    inb_r, out_r, pols_r = child_objects(cr, 9)
    assert {s.protocol for s in (inb_i, out_i, inb_r, out_r)} == {"ah"} and out_i.transform == transform
    assert all(p.template is not None and p.template.protocol == "ah" for p in pols_i + pols_r)
    assert [t.template.protocol for t in trap_policies("conn", A, B, w.i.cfg.children[0], 3) if t.template] == \
        ["ah", "ah"]  # fmt: skip
    # the negotiated keys carry traffic both ways: IP protocol 51, our peer and scapy verify it
    inner = tcp4("10.1.0.5", "10.2.0.9") if mode == "tunnel" else tcp4(A, B)
    wire = protect(out_i, inner)
    assert wire[9] == 51 and wire[20] in (6, 4)  # outer protocol AH; AH's next header is TCP or IPv4
    assert unprotect(inb_r, wire) == inner
    back = icmp4("10.2.0.9", "10.1.0.5") if mode == "tunnel" else icmp4(B, A)
    assert unprotect(inb_i, protect(out_r, back)) == back
    tampered = bytearray(wire)
    tampered[-1] ^= 1
    with pytest.raises(Exception):  # noqa: B017 - the ICV check refuses it (Dropped)
        unprotect(inb_r, bytes(tampered))
    kw: dict[str, object] = dict(auth_algo=SCAPY_AUTH[transform], auth_key=ci.key_out, esn_en=esn, esn=0)
    if mode == "tunnel":
        kw["tunnel_header"] = IP(src=A, dst=B)
    ref = ScapySA(AH, spi=ci.spi_out, **kw)
    assert bytes(ref.decrypt(IP(wire))) == inner


def test_ah_and_esp_children_do_not_match() -> None:
    cfg_r = ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")  # ESP only
    w = Wire(_ah_cfg(A, B, "10.1.0.0/16", "10.2.0.0/16"), cfg_r)
    w.run()
    assert w.i.established and not _ups(w.i) and not _ups(w.r)
    assert "NO_PROPOSAL_CHOSEN" in w.i.failure


def test_rekey_of_an_ah_child_names_ah_in_rekey_sa() -> None:
    w = _wire("sha256-x25519")
    w.i.cfg.children[0].rekey_time = 100.0
    w.run()
    (old_i,), (old_r,) = _ups(w.i), _ups(w.r)
    assert old_i.rekey_at is not None
    t = old_i.rekey_at
    w.i.handle_timer(t)
    w.run(t)
    (req,) = _inner(w, "i->r", Exchange.CREATE_CHILD_SA)
    rekey = next(p for p in req if isinstance(p, m.Notify) and p.notify_type == Notify.REKEY_SA)
    # §3.10.1: REKEY_SA carries the protocol and the SPI of the SA being rekeyed
    assert rekey.protocol == Protocol.AH and rekey.spi == old_i.spi_in.to_bytes(4, "big")
    (sa,) = [p for p in req if isinstance(p, m.SA)]
    assert sa.proposals[0].protocol == Protocol.AH and any(isinstance(p, m.KE) for p in req)  # PFS
    ev_i, ev_r = sa_events(w.i), sa_events(w.r)
    new_i = next(e for e in ev_i if isinstance(e, ChildUp))
    new_r = next(e for e in ev_r if isinstance(e, ChildUp))
    assert new_i.protocol == new_r.protocol == "ah" and new_i.replaces == old_i.spi_in
    assert new_r.replaces == old_r.spi_in and new_i.key_out == new_r.key_in and new_i.key_out != old_i.key_out
    # the old pair is retired with an AH Delete (§3.11), answered with the peer's AH SPI
    (delete_req,) = _inner(w, "i->r", Exchange.INFORMATIONAL)
    (delete_resp,) = _inner(w, "r->i", Exchange.INFORMATIONAL)
    assert delete_req == [m.Delete(Protocol.AH, [old_i.spi_in.to_bytes(4, "big")])]
    assert delete_resp == [m.Delete(Protocol.AH, [old_r.spi_in.to_bytes(4, "big")])]
    assert [e.spi_in for e in ev_i if isinstance(e, ChildDown)] == [old_i.spi_in]
    assert [e.spi_in for e in ev_r if isinstance(e, ChildDown)] == [old_r.spi_in]
    assert [c.spi_in for c in w.i.children] == [new_i.spi_in] and w.r is not None
    assert [c.spi_in for c in w.r.children] == [new_r.spi_in]


def test_responder_rekeys_ah_only_for_an_ah_rekey_sa() -> None:
    """SPIs are per protocol: a REKEY_SA naming ESP with the AH child's SPI finds no child SA."""
    w = _wire()
    w.run()
    (ci,) = _ups(w.i)
    sa_events(w.r)
    inner, _, _, _ = child_common.request(w.i, ci.child, ci.local_ts, ci.remote_ts, ci.mode, ci.spi_in)
    inner[0] = m.Notify(Notify.REKEY_SA, b"", Protocol.ESP, ci.spi_in.to_bytes(4, "big"))
    w.i.tasks.send_request(Exchange.CREATE_CHILD_SA, inner, 1.0)
    w.run(1.0)
    (resp,) = _inner(w, "r->i", Exchange.CREATE_CHILD_SA)
    assert resp == [m.Notify(Notify.CHILD_SA_NOT_FOUND, b"", Protocol.ESP, ci.spi_in.to_bytes(4, "big"))]
    assert not _ups(w.r)


def test_deleting_an_ah_child() -> None:
    w = _wire()
    w.run()
    (ci,), (cr,) = _ups(w.i), _ups(w.r)
    assert w.r is not None
    # an ESP Delete with the AH SA's SPI names another SA (RFC 4301 §4.1): nothing goes
    w.r.tasks.send_request(Exchange.INFORMATIONAL, [m.Delete(Protocol.ESP, [cr.spi_in.to_bytes(4, "big")])], 2.0)
    w.run(2.0)
    assert len(w.i.children) == 1 and not sa_events(w.i)
    # the datapath's hard lifetime ends it: an AH Delete, answered with the peer's AH SPI
    assert w.i.child_expired(ci.spi_out, 3.0)
    w.run(3.0)
    req = _inner(w, "i->r", Exchange.INFORMATIONAL)[-1]
    resp = _inner(w, "r->i", Exchange.INFORMATIONAL)[-1]
    assert req == [m.Delete(Protocol.AH, [ci.spi_in.to_bytes(4, "big")])]
    assert resp == [m.Delete(Protocol.AH, [cr.spi_in.to_bytes(4, "big")])]
    downs_r = [e for e in sa_events(w.r) if isinstance(e, ChildDown)]
    assert [(e.spi_in, e.cause) for e in downs_r] == [(cr.spi_in, "peer")]
    assert [e.spi_in for e in sa_events(w.i) if isinstance(e, ChildDown)] == [ci.spi_in]
    assert w.i.children == [] and w.r.children == [] and w.i.established and w.r.established


def test_second_child_over_create_child_sa_can_be_ah() -> None:
    cfg_i, cfg_r = ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16")
    for cfg, lnet, rnet in ((cfg_i, "10.11.0.0/16", "10.22.0.0/16"), (cfg_r, "10.22.0.0/16", "10.11.0.0/16")):
        cfg.children.append(ChildConfig("auth-only", [ts_range(lnet)], [ts_range(rnet)],
                                        [props.parse("sha384-ecp256", Protocol.AH)]))  # fmt: skip
    w = Wire(cfg_i, cfg_r)
    w.run()
    ups_i, ups_r = _ups(w.i), _ups(w.r)
    assert [(u.child.name, u.protocol, u.transform) for u in ups_i] == [("net", "esp", "aes128gcm16"),
                                                                        ("auth-only", "ah", "sha384")]  # fmt: skip
    assert ups_i[1].key_out == ups_r[1].key_in and len(ups_i[1].key_out) == 48
    (req,) = _inner(w, "i->r", Exchange.CREATE_CHILD_SA)
    (sa,) = [p for p in req if isinstance(p, m.SA)]
    assert [p.protocol for p in sa.proposals] == [Protocol.AH] and any(isinstance(p, m.KE) for p in req)


# --- NAT ----------------------------------------------------------------------------------------------


def test_ah_child_is_refused_across_a_nat() -> None:
    w = _wire()
    w.src_seen_by_r = "198.51.100.7"  # a NAT rewrote the initiator's address
    w.cfg_r.remote_addr = None
    w.run()
    assert w.i.established and w.i.nat and not _ups(w.i) and not _ups(w.r)
    (resp,) = _inner(w, "r->i", Exchange.IKE_AUTH)
    assert m.Notify(Notify.NO_PROPOSAL_CHOSEN) in resp
    assert w.r is not None and "AH cannot cross a NAT" in w.r.failure and w.r.stats["ah_behind_nat"] == 1
    assert "NO_PROPOSAL_CHOSEN (AH cannot cross a NAT" in w.i.failure
    # another AH child is not even proposed over CREATE_CHILD_SA
    assert w.i.create_child("net", 5.0)
    assert "not proposed: AH cannot cross a NAT" in w.i.failure and not w.i.datagrams()


def test_forced_encap_refuses_ah_too() -> None:
    w = _wire()
    w.i.cfg.encap = True  # strongSwan's encap = yes: a faked NAT (config validation refuses it with AH)
    w.run()
    assert w.i.established and not _ups(w.i) and not _ups(w.r)
    assert "AH cannot cross a NAT" in w.i.failure


def test_initiator_drops_ah_a_peer_accepted_across_a_nat() -> None:
    """A peer that accepts AH behind a NAT anyway: we install nothing and ask it to delete its half."""
    w = _wire()
    w.src_seen_by_r = "198.51.100.7"
    w.cfg_r.remote_addr = None
    w.i.start(0.0)
    w.to_responder(w.i.datagrams(), 0.0)
    assert w.r is not None and w.r.nat
    w.r.nat = False  # this responder does not care about the NAT
    w.run()
    assert w.i.established and not _ups(w.i) and "not installed: AH cannot cross a NAT" in w.i.failure
    (cr,) = [e for e in sa_events(w.r) if isinstance(e, ChildUp)]
    assert _inner(w, "i->r", Exchange.INFORMATIONAL) == [[m.Delete(Protocol.AH, [cr.spi_out.to_bytes(4, "big")])]]
    assert w.r.children == [] and w.i.children == []


def test_ipv6_tunnel_ah_child_carries_traffic() -> None:
    a6, b6 = "2001:db8::1", "2001:db8::2"
    cfg_i = _ah_cfg(a6, b6, "fd00:1::/64", "fd00:2::/64", "sha512")
    cfg_r = _ah_cfg(b6, a6, "fd00:2::/64", "fd00:1::/64", "sha512")
    w = Wire(cfg_i, cfg_r)
    w.src_seen_by_r = a6
    w.i.remote = b6
    w.run()
    (ci,), (cr,) = _ups(w.i), _ups(w.r)
    _, out_i, _ = child_objects(ci, 1)
    inb_r, _, _ = child_objects(cr, 2)
    from tests.packets import udp6

    inner = udp6("fd00:1::10", "fd00:2::20")
    wire = protect(out_i, inner)
    assert wire[6] == 51 and unprotect(inb_r, wire) == inner
    ref = ScapySA(AH, spi=ci.spi_out, auth_algo="SHA2-512-256", auth_key=ci.key_out, tunnel_header=IPv6(src=a6, dst=b6))
    assert bytes(ref.decrypt(IPv6(wire))) == inner


def test_updown_script_sees_pluto_proto_ah() -> None:
    from ipsecstack.runtime.updown import environment

    w = _wire()
    w.run()
    (ci,) = _ups(w.i)
    env = environment(ci, 1, True, ci.local_ts[0], ci.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_PROTO"] == "ah"  # as strongSwan's updown: the child's protocol
