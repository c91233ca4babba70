"""Certificate authentication: signatures (RFC 7296 §3.8, RFC 7427, RFC 8420), paths, identities, sessions."""

from __future__ import annotations

import datetime
import time

import pytest

from ipsecstack.ike import auth
from ipsecstack.ike import message as m
from ipsecstack.ike.certs import ca_hash, cert_has_id, verify_path
from ipsecstack.ike.const import AuthMethod, IdType, Notify
from ipsecstack.ike.dn import dn_from_text, dn_text, parse_dn, same_dn
from ipsecstack.ike.session import ChildUp, IkeDown, IkeSa, IkeUp, PeerConfig, id_text, identity
from tests.ike.helpers import A, B, Wire, ike_config, sa_events
from tests.pkiutil import issue

NOW = time.time()
OCTETS = b"signed octets " * 20


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    root = issue("Test Root CA", ca=True)
    sub = issue("Test Sub CA", root, ca=True, path_length=0)
    return {
        "root": root,
        "sub": sub,
        "a": issue("gw-a.example", root, san=("gw-a.example", A)),
        "b": issue("gw-b.example", sub, san=("gw-b.example", B, "admin@b.example"), kind="rsa"),
        "other_root": issue("Other Root", ca=True),
    }


# --- RFC 7427 encodings: the AlgorithmIdentifier bytes are RFC 7427 Appendix A's -------------------------


def test_algorithm_identifiers_are_rfc7427_appendix_a() -> None:
    assert auth.ALGIDS[bytes.fromhex("300d06092a864886f70d01010b0500")] == ("rsa", auth.HashAlg.SHA2_256)
    assert auth.ALGIDS[bytes.fromhex("300a06082a8648ce3d040302")] == ("ecdsa", auth.HashAlg.SHA2_256)
    assert auth.ALGIDS[bytes.fromhex("300a06082a8648ce3d040304")] == ("ecdsa", auth.HashAlg.SHA2_512)
    assert auth.ALGIDS[bytes.fromhex("300506032b6570")] == ("ed25519", auth.HashAlg.IDENTITY)  # RFC 8420


def test_hash_notify_round_trip() -> None:
    n = auth.hash_notify()
    assert n.notify_type == Notify.SIGNATURE_HASH_ALGORITHMS
    assert auth.parse_hashes(n.data) == {2, 3, 4, 5}
    assert auth.parse_hashes(b"\x00\x02\x00") == {2}  # a trailing odd byte is ignored, not a crash


@pytest.mark.parametrize("kind", ["rsa", "ecdsa256", "ecdsa384", "ecdsa521", "ed25519"])
@pytest.mark.parametrize("peer", [None, frozenset({2, 3, 4, 5}), frozenset({4}), frozenset({1})])
def test_sign_then_verify(kind: str, peer: frozenset[int] | None) -> None:
    cert = issue("signer", kind=kind)
    a = auth.sign(cert.key, OCTETS, peer)
    if kind == "ed25519" or (peer is not None and peer & {2, 3, 4}):
        assert a.method == AuthMethod.DIGITAL_SIGNATURE
    else:
        want = {"rsa": AuthMethod.RSA_SIG, "ecdsa256": AuthMethod.ECDSA_256, "ecdsa384": AuthMethod.ECDSA_384,
                "ecdsa521": AuthMethod.ECDSA_521}[kind]  # fmt: skip
        assert a.method == want
    if peer == frozenset({4}) and kind != "ed25519":
        assert "sha2_512" in auth.describe(a)
    assert auth.verify(cert.cert, a, OCTETS) is None
    assert "does not verify" in (auth.verify(cert.cert, a, OCTETS + b"x") or "")
    other = issue("someone else", kind=kind)
    assert auth.verify(other.cert, a, OCTETS) is not None


def test_verify_rejects_mismatched_and_malformed() -> None:
    ec_cert, rsa_cert = issue("ec"), issue("rsa", kind="rsa")
    a = auth.sign(ec_cert.key, OCTETS, frozenset({2}))
    assert "does not fit" in (auth.verify(rsa_cert.cert, a, OCTETS) or "")
    assert "unsupported" in (auth.verify(ec_cert.cert, m.Auth(14, b"\x03abcsig"), OCTETS) or "")
    assert auth.verify(ec_cert.cert, m.Auth(14, b""), OCTETS) is not None
    assert "needs a secp384r1" in (auth.verify(ec_cert.cert, m.Auth(AuthMethod.ECDSA_384, bytes(96)), OCTETS) or "")
    assert "does not fit" in (auth.verify(ec_cert.cert, m.Auth(AuthMethod.PSK, bytes(32)), OCTETS) or "")
    classic = auth.sign(ec_cert.key, OCTETS, None)
    assert auth.verify(ec_cert.cert, m.Auth(classic.method, classic.data[:-1]), OCTETS) is not None


# --- names and identities ----------------------------------------------------------------------------------


def test_distinguished_names() -> None:
    der = dn_from_text("C=CH, O=strongSwan Project, CN=moon.strongswan.org")
    assert dn_text(der) == "C=CH, O=strongSwan Project, CN=moon.strongswan.org"
    assert parse_dn(der)[2] == [("2.5.4.3", "moon.strongswan.org")]
    assert same_dn(der, dn_from_text("c=ch,o=strongswan  project,cn=MOON.strongswan.org"))
    assert not same_dn(der, dn_from_text("C=CH, O=strongSwan Project, CN=sun.strongswan.org"))
    assert dn_text(dn_from_text("O=a\\, b, E=x@y.example")) == "O=a, b, E=x@y.example"
    assert identity("C=CH, CN=x")[0] == IdType.ID_DER_ASN1_DN
    assert id_text(*identity("C=CH, CN=x")) == "C=CH, CN=x"
    for bad in ("C=CH, bogus=1", "C=Switzerland"):
        with pytest.raises(ValueError):
            identity(bad)
    assert dn_text(b"\x30\x05garbage").startswith("asn1dn:#")


def test_identity_in_certificate(pki: dict[str, object]) -> None:
    b = pki["b"].cert  # type: ignore[attr-defined]
    assert cert_has_id(b, *identity("gw-b.example"))
    assert cert_has_id(b, *identity("GW-B.example"))
    assert cert_has_id(b, *identity(B))
    assert cert_has_id(b, *identity("admin@b.example"))
    assert cert_has_id(b, IdType.ID_DER_ASN1_DN, b.subject.public_bytes())
    assert cert_has_id(b, *identity("C=CH, O=ipsecstack test, CN=gw-b.example"))
    assert not cert_has_id(b, *identity("gw-a.example"))
    assert not cert_has_id(b, *identity(A))
    assert not cert_has_id(b, *identity("keyid:gw-b.example"))


# --- certificate paths -------------------------------------------------------------------------------------


def test_paths(pki: dict[str, object]) -> None:
    root, sub, a, b, other = (pki[k].cert for k in ("root", "sub", "a", "b", "other_root"))  # type: ignore[attr-defined]
    assert verify_path(a, [], [root], [], NOW) is None
    assert verify_path(b, [sub], [root], [], NOW) is None
    assert verify_path(b, [], [sub], [], NOW) is None  # an intermediate can be the anchor
    assert "no trusted CA" in (verify_path(b, [], [root], [], NOW) or "")
    assert "no trusted CA" in (verify_path(a, [], [other], [], NOW) or "")
    assert verify_path(b, [], [], [b], NOW) is None  # pinned
    assert "no remote.cacerts" in (verify_path(a, [], [], [b], NOW) or "")
    assert "expired" in (verify_path(a, [], [root], [], NOW + 400 * 86400) or "")
    assert "not valid before" in (verify_path(a, [], [root], [], NOW - 5 * 86400) or "")


def test_path_rules() -> None:
    root = issue("Root", ca=True, path_length=0)
    sub = issue("Sub", root, ca=True)
    leaf = issue("leaf", sub)
    assert "pathLenConstraint" in (verify_path(leaf.cert, [sub.cert], [root.cert], [], NOW) or "")
    assert verify_path(leaf.cert, [sub.cert], [sub.cert], [], NOW) is None  # anchored at Sub: no constraint
    root3 = issue("Root3", ca=True)
    mid = issue("Mid", root3)  # no basicConstraints
    assert "not a CA" in (verify_path(issue("x", mid).cert, [mid.cert], [root3.cert], [], NOW) or "")
    enc_only = issue("enc", root3, key_usage="encipher-only")
    assert "keyUsage" in (verify_path(enc_only.cert, [], [root3.cert], [], NOW) or "")
    expired_root = issue("Old Root", ca=True, days=(-30, -1))
    assert "expired" in (verify_path(issue("y", expired_root).cert, [], [expired_root.cert], [], NOW) or "")
    forged = issue("Root3", ca=True)  # same name, other key: the signature check catches it
    assert "no trusted CA" in (verify_path(issue("z", forged).cert, [], [root3.cert], [], NOW) or "")


def test_ca_hash_is_sha1_of_spki(pki: dict[str, object]) -> None:
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    root = pki["root"].cert  # type: ignore[attr-defined]
    spki = root.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert ca_hash(root) == hashlib.sha1(spki).digest() and len(ca_hash(root)) == 20


# --- two IKE SAs authenticating with certificates ---------------------------------------------------------


def _cert_cfg(base: PeerConfig, me: object, anchors: tuple[object, ...], *, local: str = "pubkey",
              remote: str = "pubkey", chain: tuple[object, ...] = (), pinned: tuple[object, ...] = (),
              certreq: bool = True, remote_id: str | None = None) -> PeerConfig:  # fmt: skip
    base.creds = auth.Credentials(
        local, remote, me.key if local == "pubkey" else None,  # type: ignore[attr-defined]
        tuple(x.cert for x in (me, *chain)) if local == "pubkey" else (),  # type: ignore[attr-defined]
        cacerts=tuple(x.cert for x in anchors), peer_certs=tuple(x.cert for x in pinned),  # type: ignore[attr-defined]
        send_certreq=certreq,
    )  # fmt: skip
    if local == "pubkey":
        base.local_id = (IdType.ID_DER_ASN1_DN, me.cert.subject.public_bytes())  # type: ignore[attr-defined]
    base.remote_id = identity(remote_id) if remote_id else None
    return base


def _wire(cfg_i: PeerConfig, cfg_r: PeerConfig, when: float = NOW) -> Wire:
    w = Wire(cfg_i, cfg_r)
    w.i.wallclock = lambda: when
    orig = w.to_responder

    def to_responder(dgs: list, now: float) -> None:  # type: ignore[type-arg]
        orig(dgs, now)
        if w.r is not None:
            w.r.wallclock = lambda: when

    w.to_responder = to_responder  # type: ignore[method-assign]
    return w


def _up(sa: IkeSa | None) -> bool:
    return sa is not None and sa.established


def test_session_with_certificates(pki: dict[str, object]) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["root"],),
                  remote_id="C=CH, O=ipsecstack test, CN=gw-b.example")  # fmt: skip
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    w = _wire(i, r)
    w.run()
    assert _up(w.i) and _up(w.r)
    ev_i, ev_r = sa_events(w.i), sa_events(w.r)
    assert any(isinstance(e, ChildUp) for e in ev_i) and any(isinstance(e, IkeUp) for e in ev_r)
    assert w.i.peer_cert == pki["b"].cert and w.r.peer_cert == pki["a"].cert  # type: ignore[union-attr, attr-defined]
    assert w.i.peer_id is not None and id_text(*w.i.peer_id) == "C=CH, O=ipsecstack test, CN=gw-b.example"
    # what went over the wire: CERTREQ in IKE_SA_INIT's response, hash notifies both ways
    init_resp = m.decode(w.log[1][1].data)
    req = [p for p in init_resp.payloads if isinstance(p, m.Certificate) and p.request]
    assert req and req[0].data == ca_hash(pki["root"].cert)  # type: ignore[attr-defined]
    assert any(n.notify_type == Notify.SIGNATURE_HASH_ALGORITHMS for n in init_resp.notifies())


def test_asymmetric_psk_and_certificate(pki: dict[str, object]) -> None:
    # the initiator proves itself with the PSK, the responder with its certificate
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["root"],), local="psk")
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (), remote="psk", chain=(pki["sub"],))
    w = _wire(i, r)
    w.run()
    assert _up(w.i) and _up(w.r)


def test_pinned_certificate_without_ca(pki: dict[str, object]) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (), pinned=(pki["b"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (), pinned=(pki["a"],), certreq=False)
    w = _wire(i, r)
    w.run()
    assert _up(w.i) and _up(w.r)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_ca", "no trusted CA"),
        ("expired", "expired"),
        ("psk_vs_cert", "remote.auth = pubkey expects a certificate"),
        ("cert_vs_psk", "remote.auth = psk expects a pre-shared key"),
        ("identity", "identity mismatch"),
        ("forged_id", "not in its certificate"),
    ],
)
def test_certificate_failures(pki: dict[str, object], case: str, reason: str) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["a"], (pki["root"],))
    when = NOW
    if case == "wrong_ca":
        r = _cert_cfg(r, pki["a"], (pki["other_root"],))
    elif case == "expired":
        when = NOW + 400 * 86400
    elif case == "psk_vs_cert":
        i = _cert_cfg(i, pki["b"], (pki["root"],), local="psk")
    elif case == "cert_vs_psk":
        r = _cert_cfg(r, pki["a"], (), remote="psk")
    elif case == "identity":
        r = _cert_cfg(r, pki["a"], (pki["root"],), remote_id="gw-c.example")
    elif case == "forged_id":
        i.local_id = identity("gw-a.example")  # b claims a's name with its own certificate
    w = _wire(i, r, when)
    w.run()
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and reason in down[0].reason, down
    assert not _up(w.i) and w.r is not None and w.r.stats.get("auth_failed") == 1
    assert any(isinstance(e, IkeDown) and "AUTHENTICATION_FAILED" in e.reason for e in sa_events(w.i))


def test_responder_certificate_rejected_by_initiator(pki: dict[str, object]) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["other_root"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    w = _wire(i, r)
    w.run()
    down = [e for e in sa_events(w.i) if isinstance(e, IkeDown)]
    assert down and "responder" in down[0].reason and "no trusted CA" in down[0].reason


def test_no_wall_clock_fails_closed(pki: dict[str, object]) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["root"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    w = Wire(i, r)
    w.run()
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and "wall clock" in down[0].reason


def test_garbage_cert_payload_is_an_auth_failure(pki: dict[str, object]) -> None:
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["root"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    bad = auth.Credentials(**{**i.creds.__dict__})
    object.__setattr__(bad, "cert_payloads", lambda: [m.Certificate(4, b"\x30\x03not a cert")])
    i.creds = bad
    w = _wire(i, r)
    w.run()
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and "not a valid DER" in down[0].reason


def test_datetime_edges() -> None:
    c = issue("edge", days=(0, 1)).cert
    start = c.not_valid_before_utc.timestamp()
    assert verify_path(c, [], [], [c], start) is None
    assert verify_path(c, [], [], [c], start - 1) is not None
    assert c.not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_initiator_tells_the_responder_when_it_refuses_it(pki: dict[str, object]) -> None:
    # RFC 7296 §2.21.2: the responder thinks the IKE SA is up; an INFORMATIONAL with the error closes it
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), pki["a"], (pki["other_root"],))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), pki["b"], (pki["root"],), chain=(pki["sub"],))
    w = _wire(i, r)
    w.run()
    assert [(d, m.decode(g.data).exchange) for d, g in w.log][-2:] == [("i->r", 37), ("r->i", 37)]  # INFORMATIONAL
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and "AUTHENTICATION_FAILED" in down[0].reason, down
