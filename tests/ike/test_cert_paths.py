"""Peer certificate paths validated by cryptography's RFC 5280 verifier with the IKE profile (RFC 4945 §5.1.3).

Each refusal names its cause; each acceptance is a chain an IKE peer may present. The PKIs are built per
test run with ``tests/pkiutil.py``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from ipsecstack.ike.certs import verify_path
from ipsecstack.ike.session import IkeDown, IkeUp
from tests.ike.helpers import A, B, ike_config, sa_events
from tests.ike.test_auth import _cert_cfg, _wire
from tests.pkiutil import Issued, crl, issue

NOW = time.time()
DAY = 86400.0
SUB, LEAF = "'C=CH, O=ipsecstack test, CN=Paths Sub CA'", "'C=CH, O=ipsecstack test, CN=gw.example'"
UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")


def _ku(*, sign: bool = False, cert_sign: bool = False, encipher: bool = False) -> tuple[x509.KeyUsage, bool]:
    return x509.KeyUsage(sign, False, encipher, False, False, cert_sign, False, False, False), True


def _eku(*oids: x509.ObjectIdentifier) -> tuple[x509.ExtendedKeyUsage, bool]:
    return x509.ExtendedKeyUsage(list(oids)), False


def _nc(*permitted: x509.GeneralName) -> tuple[x509.NameConstraints, bool]:
    return x509.NameConstraints(list(permitted), None), True


Chain = tuple[Issued, list[Issued], list[Issued]]  # leaf, intermediates it sends, our trust anchors


def _root() -> Issued:
    return issue("Paths Root CA", ca=True)


def _via(sub_kw: dict[str, object], leaf_kw: dict[str, object], root: Issued | None = None) -> Chain:
    """root -> "Paths Sub CA" (``sub_kw``) -> "gw.example" (``leaf_kw``), anchored at the root."""
    root = root or _root()
    sub = issue("Paths Sub CA", root, **{"ca": True, **sub_kw})  # type: ignore[arg-type]
    leaf = issue("gw.example", sub, **{"san": ("gw.example",), **leaf_kw})  # type: ignore[arg-type]
    return leaf, [sub], [root]


def _direct(**leaf_kw: object) -> Chain:
    root = _root()
    return issue("gw.example", root, **leaf_kw), [], [root]  # type: ignore[arg-type]


def _path_len() -> Chain:
    root = issue("Paths Root CA", ca=True, path_length=0)
    return _via({}, {}, root)


def _ca_false_issuer() -> Chain:
    root = _root()
    mid = issue("Not A CA", root, extensions=((x509.BasicConstraints(ca=False, path_length=None), True),))
    return issue("gw.example", mid), [mid], [root]


def _direct_under(root: Issued) -> Chain:
    return issue("gw.example", root), [], [root]


def _unrelated() -> Chain:
    leaf, sub, _ = _via({}, {})
    return leaf, sub, [issue("Unrelated Root CA", ca=True)]


REFUSED: dict[str, tuple[Callable[[], Chain], float, str]] = {
    # name: (chain, time offset, the words the refusal must contain)
    "intermediate keyUsage without keyCertSign": (
        lambda: _via({"extensions": (_ku(sign=True),)}, {}),
        0,
        f"issuer {SUB} may not sign certificates (keyUsage without keyCertSign)",
    ),
    "nameConstraints violated (DNS)": (
        lambda: _via({"extensions": (_nc(x509.DNSName("corp.example")),)}, {"san": ("gw.elsewhere.example",)}),
        0,
        f"(subjectAltName: gw.elsewhere.example) fails the nameConstraints of {SUB}",
    ),
    "nameConstraints violated (IP)": (
        lambda: _via(
            {"extensions": (_nc(x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))),)}, {"san": ("192.0.2.1",)}
        ),
        0,
        "fails the nameConstraints",
    ),
    "unknown critical extension on the end entity": (
        lambda: _direct(extensions=((UNKNOWN, True),)),
        0,
        f"certificate {LEAF} has a critical extension 1.3.6.1.4.1.55555.1",
    ),
    "unknown critical extension on the intermediate": (
        lambda: _via({"extensions": ((UNKNOWN, True),)}, {}),
        0,
        f"{SUB} has a critical extension 1.3.6.1.4.1.55555.1",
    ),
    "expired end entity": (_direct, 400 * DAY, f"certificate {LEAF} expired"),
    "expired intermediate": (
        lambda: _via({"days": (-30, -2)}, {"days": (-3, 30)}),
        0,
        f"certificate {SUB} expired",
    ),
    "not yet valid": (lambda: _direct(days=(2, 30)), 0, f"certificate {LEAF} is not valid before"),
    "extendedKeyUsage emailProtection only": (
        lambda: _direct(extensions=(_eku(EKU.EMAIL_PROTECTION),)),
        0,
        "is not for IKE: its extendedKeyUsage lists emailProtection",
    ),
    "extendedKeyUsage codeSigning and timeStamping": (
        lambda: _direct(extensions=(_eku(EKU.CODE_SIGNING, EKU.TIME_STAMPING),)),
        0,
        "lists codeSigning, timeStamping, none of serverAuth",
    ),
    "end-entity keyUsage without digitalSignature": (
        lambda: _direct(extensions=(_ku(encipher=True),)),
        0,
        "has a keyUsage without digitalSignature",
    ),
    "pathLenConstraint exceeded": (
        _path_len,
        0,
        "path too long for CA 'C=CH, O=ipsecstack test, CN=Paths Root CA' (pathLenConstraint 0)",
    ),
    "issuer with CA:false": (_ca_false_issuer, 0, "issuer 'C=CH, O=ipsecstack test, CN=Not A CA' is not a CA"),
    "unrelated CA": (_unrelated, 0, f"no trusted CA issued {SUB}"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_its_reason(case: str) -> None:
    build, offset, words = REFUSED[case]
    leaf, sent, anchors = build()
    why = verify_path(leaf.cert, [c.cert for c in sent], [a.cert for a in anchors], [], NOW + offset)
    assert why is not None and words in why, why


ACCEPTED: dict[str, Callable[[], Chain]] = {
    "no extendedKeyUsage": _direct,
    "serverAuth": lambda: _direct(extensions=(_eku(EKU.SERVER_AUTH),)),
    "clientAuth": lambda: _direct(extensions=(_eku(EKU.CLIENT_AUTH),)),
    "ipsecIKE": lambda: _direct(extensions=(_eku(x509.ObjectIdentifier("1.3.6.1.5.5.7.3.17")),)),
    "anyExtendedKeyUsage": lambda: _direct(extensions=(_eku(EKU.ANY_EXTENDED_KEY_USAGE),)),
    "emailProtection and ipsecIKE": lambda: _direct(extensions=(_eku(EKU.EMAIL_PROTECTION, EKU.IPSEC_IKE),)),
    "RSA end entity": lambda: _direct(kind="rsa"),
    "ECDSA P-384 end entity": lambda: _direct(kind="ecdsa384"),
    "ECDSA P-521 end entity": lambda: _direct(kind="ecdsa521"),
    "Ed25519 end entity": lambda: _direct(kind="ed25519"),
    "no subjectAltName": lambda: _direct(san=()),
    "keyUsage digitalSignature, CA keyUsage keyCertSign": lambda: _via(
        {"extensions": (_ku(cert_sign=True),)}, {"extensions": (_ku(sign=True),)}
    ),
    "chain with an intermediate": lambda: _via({}, {}),
    "chain with an RSA root": lambda: _via({"kind": "rsa"}, {}, issue("RSA Root CA", ca=True, kind="rsa")),
    "inside nameConstraints": lambda: _via(
        {"extensions": (_nc(x509.DNSName("example")),)}, {"san": ("gw.example", "192.0.2.1")}
    ),
    "pathLenConstraint 0 with no intermediate": lambda: _direct_under(issue("Paths Root CA", ca=True, path_length=0)),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted(case: str) -> None:
    leaf, sent, anchors = ACCEPTED[case]()
    assert verify_path(leaf.cert, [c.cert for c in sent], [a.cert for a in anchors], [], NOW) is None


def test_the_verifier_decides_what_we_cannot_name() -> None:
    """A critical directoryName constraint is refused by cryptography's verifier; we report its words."""
    leaf, sent, anchors = _via({"extensions": (_nc(x509.DirectoryName(x509.Name([]))),)}, {})
    why = verify_path(leaf.cert, [sent[0].cert], [anchors[0].cert], [], NOW) or ""
    assert f"fails the nameConstraints of {SUB}" in why, why
    assert "unsupported directoryName constraint" in why, why


def test_ed25519_ca_is_refused_by_name() -> None:
    """cryptography's verifier accepts certificate signatures by RSA and ECDSA keys only."""
    root = issue("Ed Root CA", ca=True, kind="ed25519")
    why = verify_path(issue("gw.example", root).cert, [], [root.cert], [], NOW) or ""
    assert "trust anchor 'C=CH, O=ipsecstack test, CN=Ed Root CA' signs with a key type" in why, why


def test_pinned_certificates() -> None:
    root = _root()
    pinned = issue("gw.example", root)
    assert verify_path(pinned.cert, [], [], [pinned.cert], NOW) is None
    assert verify_path(pinned.cert, [], [issue("Unrelated", ca=True).cert], [pinned.cert], NOW) is None
    self_signed = issue("self.example")  # no basicConstraints, no CA: a pinned certificate needs neither
    assert verify_path(self_signed.cert, [], [], [self_signed.cert], NOW) is None
    assert "expired" in (verify_path(pinned.cert, [], [], [pinned.cert], NOW + 400 * DAY) or "")
    email = issue("mail.example", root, extensions=(_eku(EKU.EMAIL_PROTECTION),))
    assert "is not for IKE" in (verify_path(email.cert, [], [], [email.cert], NOW) or "")
    odd = issue("odd.example", extensions=((UNKNOWN, True),))
    assert "critical extension 1.3.6.1.4.1.55555.1" in (verify_path(odd.cert, [], [], [odd.cert], NOW) or "")
    # a pinned certificate is a trust anchor for itself only, never for what its key signs
    pinned_ca = issue("Pinned CA", ca=True)
    signed = issue("gw.example", pinned_ca)
    assert "no remote.cacerts" in (verify_path(signed.cert, [pinned_ca.cert], [], [pinned_ca.cert], NOW) or "")


def test_ike_auth_refuses_a_peer_certificate_not_for_ike() -> None:
    """End to end: the responder refuses the initiator's emailProtection-only certificate in IKE_AUTH."""
    root = _root()
    a = issue("gw-a.example", root, san=("gw-a.example",), extensions=(_eku(EKU.EMAIL_PROTECTION),))
    b = issue("gw-b.example", root, san=("gw-b.example",), extensions=(_eku(EKU.SERVER_AUTH),))
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), a, (root,))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), b, (root,))
    w = _wire(i, r, NOW)
    w.run()
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and "is not for IKE" in down[0].reason, down
    assert not any(isinstance(e, IkeUp) for e in sa_events(w.i))


# --- revocation (remote.crls) ----------------------------------------------------------------------------


def test_revoked_end_entity_and_intermediate() -> None:
    leaf, (sub,), (root,) = _via({}, {})
    path = ([sub.cert], [root.cert], [])
    assert verify_path(leaf.cert, *path, NOW, [crl(sub), crl(root)]) is None  # CRLs listing nothing
    why = verify_path(leaf.cert, *path, NOW, [crl(root), crl(sub, (leaf,), reason=x509.ReasonFlags.key_compromise)])
    assert why is not None and f"certificate {LEAF} revoked" in why and f"(CRL of {SUB}, reason keyCompromise)" in why
    why = verify_path(leaf.cert, *path, NOW, [crl(root, (sub,))])
    assert why is not None and f"certificate {SUB} revoked" in why, why
    stale = crl(sub, (leaf,), next_days=-1)  # past nextUpdate: what it lists is still revoked
    assert "revoked" in (verify_path(leaf.cert, *path, NOW, [stale]) or "")


def test_crls_that_do_not_apply() -> None:
    leaf, (sub,), (root,) = _via({}, {})
    path = ([sub.cert], [root.cert], [])
    impostor = issue("Paths Sub CA", ca=True)  # the issuer's name, another key: its CRL is not the issuer's
    assert verify_path(leaf.cert, *path, NOW, [crl(impostor, (leaf,))]) is None
    assert verify_path(leaf.cert, *path, NOW, [crl(root, (leaf,))]) is None  # the serial is the sub CA's to revoke
    assert verify_path(leaf.cert, *path, NOW, [crl(sub, (leaf,), reason=x509.ReasonFlags.remove_from_crl)]) is None
    pinned = issue("gw.example", sub)
    assert verify_path(pinned.cert, [], [], [pinned.cert], NOW, [crl(sub, (pinned,))]) is None  # pinned: no path


def test_ike_auth_refuses_a_revoked_peer() -> None:
    root = _root()
    a = issue("gw-a.example", root, san=("gw-a.example",))
    b = issue("gw-b.example", root, san=("gw-b.example",))
    i = _cert_cfg(ike_config(A, B, "10.1.0.0/16", "10.2.0.0/16"), a, (root,))
    r = _cert_cfg(ike_config(B, A, "10.2.0.0/16", "10.1.0.0/16"), b, (root,))
    r.creds = dataclasses.replace(r.creds, crls=(crl(root, (a,)),))
    w = _wire(i, r, NOW)
    w.run()
    down = [e for e in sa_events(w.r) if isinstance(e, IkeDown)]
    assert down and "certificate 'C=CH, O=ipsecstack test, CN=gw-a.example' revoked" in down[0].reason, down
