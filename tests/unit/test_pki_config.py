"""``auth = "pubkey"``: certificates, CAs and private keys named by the config, and every error path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ipsecstack.config import load
from ipsecstack.errors import ConfigError
from ipsecstack.ike.const import IdType
from ipsecstack.ike.session import id_text
from tests.pkiutil import crl, issue

CONFIG = """
[connections.gw]
local_addrs = ["192.0.2.1"]
remote_addrs = ["192.0.2.2"]
local = { auth = "pubkey", certs = ["x509/a.pem"], cacerts = ["x509ca/sub.pem", "x509ca/root.pem"] }
remote = { auth = "pubkey", cacerts = ["x509ca/root.pem"], id = "C=CH, O=ipsecstack test, CN=gw-b.example" }

[connections.gw.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]

[secrets.private.a]
file = "private/a.pem"
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = issue("Root", ca=True)
    sub = issue("Sub", root, ca=True)
    a = issue("gw-a.example", sub, san=("gw-a.example",))
    for d in ("x509", "x509ca", "private"):
        (tmp_path / d).mkdir()
    (tmp_path / "x509/a.pem").write_bytes(a.pem())
    (tmp_path / "x509/a.der").write_bytes(a.cert.public_bytes(serialization.Encoding.DER))
    (tmp_path / "x509ca/sub.pem").write_bytes(sub.pem())
    (tmp_path / "x509ca/root.pem").write_bytes(root.pem())
    (tmp_path / "private/a.pem").write_bytes(a.key_pem())
    (tmp_path / "private/a-enc.pem").write_bytes(a.key_pem(b"open sesame"))
    (tmp_path / "private/other.pem").write_bytes(issue("other").key_pem())
    (tmp_path / "ipsecstack.toml").write_text(CONFIG)
    return tmp_path


def _load(tree: Path, text: str, env: dict[str, str] | None = None) -> object:
    (tree / "ipsecstack.toml").write_text(text)
    return load(str(tree / "ipsecstack.toml"), env or {})


def test_good_config_loads_relative_to_the_file(tree: Path) -> None:
    cfg = load(str(tree / "ipsecstack.toml"), {})
    (peer,) = cfg.connections
    c = peer.creds
    assert (c.local, c.remote, c.send_certreq) == ("pubkey", "pubkey", True)
    assert [x.subject.rfc4514_string() for x in c.certs] == [
        "CN=gw-a.example,O=ipsecstack test,C=CH",
        "CN=Sub,O=ipsecstack test,C=CH",
    ]  # root not sent
    assert c.key is not None and len(c.cacerts) == 1
    assert peer.local_id[0] == IdType.ID_DER_ASN1_DN  # strongSwan's default: our certificate's subject
    assert id_text(*peer.local_id) == "C=CH, O=ipsecstack test, CN=gw-a.example"
    assert peer.remote_id is not None and peer.remote_id[0] == IdType.ID_DER_ASN1_DN
    assert peer.psk == b""  # no [secrets.ike] needed without PSK


def test_der_certificate_encrypted_key_and_san_identity(tree: Path) -> None:
    text = CONFIG.replace('"x509/a.pem"', '"x509/a.der"').replace(
        'file = "private/a.pem"', 'file = "private/a-enc.pem"\nsecret_env = "KP"'
    )
    text = text.replace('auth = "pubkey", certs', 'auth = "pubkey", id = "gw-a.example", certs')
    (peer,) = _load(tree, text, {"KP": "open sesame"}).connections  # type: ignore[attr-defined]
    assert peer.local_id == (IdType.ID_FQDN, b"gw-a.example")


def _write_crls(tree: Path) -> None:
    ca = issue("Root", ca=True)
    (tree / "x509crl").mkdir()
    pem = serialization.Encoding.PEM
    two = crl(ca).public_bytes(pem) + crl(ca, (issue("x", ca),)).public_bytes(pem)
    (tree / "x509crl/two.pem").write_bytes(b"comment line\n" + two)  # two CRLs in one PEM file
    (tree / "x509crl/one.der").write_bytes(crl(ca).public_bytes(serialization.Encoding.DER))


def test_remote_crls_pem_and_der(tree: Path) -> None:
    _write_crls(tree)
    text = CONFIG.replace(
        'remote = { auth = "pubkey",', 'remote = { auth = "pubkey", crls = ["x509crl/two.pem", "x509crl/one.der"],'
    )
    (peer,) = _load(tree, text).connections  # type: ignore[attr-defined]
    assert [len(list(c)) for c in peer.creds.crls] == [0, 1, 0]
    assert _load(tree, CONFIG).connections[0].creds.crls == ()  # type: ignore[attr-defined]


REMOTE = 'remote = { auth = "pubkey", cacerts = ["x509ca/root.pem"],'


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        ((REMOTE, REMOTE + ' crls = ["x509crl/none.pem"],'), "connections.gw.remote.crls[0]", "cannot read"),
        ((REMOTE, REMOTE + ' crls = ["x509/a.pem"],'), "connections.gw.remote.crls[0]", "not an X.509 CRL"),
        ((REMOTE, REMOTE + ' crls = ["x509/a.der"],'), "connections.gw.remote.crls[0]", "not an X.509 CRL"),
        ((REMOTE, REMOTE + " crls = 3,"), "connections.gw.remote.crls", "list of CRL files"),
        ((REMOTE, 'remote = { auth = "psk", crls = ["x509crl/one.der"],'), "connections.gw.remote.crls",
         "only used with remote.auth = pubkey"),
        (('local = { auth = "pubkey",', 'local = { auth = "pubkey", crls = ["x509crl/one.der"],'),
         "connections.gw.local.crls", "use remote.crls"),
    ],
)  # fmt: skip
def test_crl_errors(tree: Path, change: tuple[str, str], path: str, hint: str) -> None:
    _write_crls(tree)
    assert change[0] in CONFIG
    with pytest.raises(ConfigError) as e:
        _load(tree, CONFIG.replace(*change))
    assert e.value.field == path, str(e.value)
    assert hint in str(e.value), str(e.value)


def test_check_command_with_certificates(tree: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(tree / "ipsecstack.toml")],
                       capture_output=True, text=True, timeout=30, cwd="/")  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        (('"x509/a.pem"', '"x509/missing.pem"'), "connections.gw.local.certs[0]", "cannot read"),
        (('"x509/a.pem"', '"private/a.pem"'), "connections.gw.local.certs[0]", "not an X.509"),
        (('certs = ["x509/a.pem"]', 'certs = 7'), "connections.gw.local.certs", "list of certificate files"),
        (('file = "private/a.pem"', 'file = "private/other.pem"'), "connections.gw.local.certs[0]",
         "no private key"),
        (('file = "private/a.pem"', 'file = "private/a-enc.pem"'), "secrets.private.a.file", "passphrase"),
        (('file = "private/a.pem"', 'file = "private/a-enc.pem"\nsecret = "wrong"'), "secrets.private.a.file",
         "passphrase is wrong"),
        (('file = "private/a.pem"', 'file = "private/a.pem"\nsecret = "x"'), "secrets.private.a.file",
         "not encrypted"),
        (('file = "private/a.pem"', 'file = "x509/a.pem"'), "secrets.private.a.file", "not a private key"),
        (('file = "private/a.pem"', 'path = "private/a.pem"'), "secrets.private.a.file", "give the key file"),
        (('file = "private/a.pem"', 'file = "private/a.pem"\nsecret_env = "NOPE"'), "secrets.private.a.secret_env",
         "not set"),
        (('[secrets.private.a]', '[secrets.privat.a]'), "secrets.privat", "secrets.private"),
        (('auth = "pubkey", certs', 'auth = "pubkey", id = "gw-z.example", certs'), "connections.gw.local.id",
         "not in our certificate"),
        (('remote = { auth = "pubkey", cacerts = ["x509ca/root.pem"],', 'remote = { auth = "pubkey",'),
         "connections.gw.remote.cacerts", "trust anchors"),
        (('remote = { auth = "pubkey", cacerts', 'remote = { auth = "psk", cacerts'),
         "connections.gw.remote.cacerts", "only used with remote.auth = pubkey"),
        (('remote = { auth = "pubkey", cacerts = ["x509ca/root.pem"],', 'remote = { auth = "psk",'), "secrets.ike.gw",
         "pre-shared key"),
        (('[connections.gw.children.net]', 'send_certreq = "yes"\n[connections.gw.children.net]'),
         "connections.gw.send_certreq", "true or false"),
    ],
)  # fmt: skip
def test_errors(tree: Path, change: tuple[str, str], path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tree, CONFIG.replace(*change))
    assert e.value.field == path, str(e.value)
    assert hint in str(e.value), str(e.value)
    assert "open sesame" not in str(e.value) and "PRIVATE KEY" not in str(e.value)
