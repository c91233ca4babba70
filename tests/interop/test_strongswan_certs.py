"""Certificate authentication against strongSwan: RSA, ECDSA and Ed25519, chains, CERTREQ, refusal.

A test PKI is generated per test (``tests/pkiutil.py``): a root CA, an intermediate CA for
ipsecstack's certificate (so ipsecstack must send its chain) and a certificate for strongSwan
issued by the root. strongSwan loads the root from ``swanctl/x509ca`` (a trust anchor) and its own
certificate and key from ``x509``/``private``; ipsecstack names the same files in its config,
relative to the config file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop import strongswan as sw
from tests.interop.test_strongswan import _lan, _require
from tests.netns import nsutil
from tests.netns.test_control_keys import cli
from tests.netns.test_tunnel import Daemon, _ping
from tests.pkiutil import Issued, issue

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]
PLUGINS = (*sw.PLUGINS, "pkcs8", "constraints")

CONFIG = """
[agent]
tun_addrs = ["10.1.0.1/16"]
log_level = "info"
control_socket = "{sock}"

[connections.swan]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
local = {{ auth = "pubkey", certs = ["pki/a.pem"], cacerts = ["pki/sub.pem"] }}
remote = {{ auth = "pubkey", cacerts = ["pki/root.pem"], id = "{swan_dn}" }}

[connections.swan.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
start_action = "{start}"

[secrets.private.a]
file = "pki/a.key"
"""


def _pki(ours: str, theirs: str) -> dict[str, Issued]:
    root = issue("Interop Root CA", ca=True, kind="rsa")
    sub = issue("Interop Sub CA", root, ca=True, path_length=0)
    return {
        "root": root,
        "sub": sub,
        "a": issue("ipsecstack-a", sub, kind=ours, san=("a.interop.example",)),
        "b": issue("strongswan-b", root, kind=theirs, san=("b.interop.example",)),
    }


def _write_ours(tmp_path: Path, pki: dict[str, Issued], text: str) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    (d / "a.pem").write_bytes(pki["a"].pem())
    (d / "a.key").write_bytes(pki["a"].key_pem())
    (d / "sub.pem").write_bytes(pki["sub"].pem())
    (d / "root.pem").write_bytes(pki["root"].pem())
    (tmp_path / "a.toml").write_text(text)
    return tmp_path / "a.toml"


def _swan_files(pki: dict[str, Issued], anchor: Issued) -> dict[str, bytes]:
    return {"x509ca/root.pem": anchor.pem(), "x509/b.pem": pki["b"].pem(), "private/b.pem": pki["b"].key_pem()}


CASES = [
    # (who initiates, ipsecstack's key, strongSwan's key)
    ("ipsecstack", "ecdsa256", "rsa"),
    ("strongswan", "rsa", "ecdsa384"),
    ("strongswan", "ed25519", "ecdsa256"),
    ("ipsecstack", "ecdsa521", "ed25519"),
]


@pytest.mark.parametrize(("initiator", "ours", "theirs"), CASES, ids=["-".join(c) for c in CASES])
def test_certificates(initiator: str, ours: str, theirs: str, tmp_path: Path) -> None:
    _require()
    pki = _pki(ours, theirs)
    with nsutil.netns_pair("ic") as pair:
        _lan(pair.b, "10.2.0.1/16")
        start = "start" if initiator == "ipsecstack" else "none"
        path = _write_ours(tmp_path, pki, CONFIG.format(local=pair.addr_a, remote=pair.addr_b, swan_dn=pki["b"].dn,
                                                        start=start, sock=tmp_path / "c.sock"))  # fmt: skip
        with sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, psk="unused", local_ts="10.2.0.0/16",
                           remote_ts="10.1.0.0/16", conn="swan", child="net", plugins=PLUGINS,
                           local_auth={"auth": "pubkey", "certs": "b.pem"},
                           remote_auth={"auth": "pubkey", "id": pki["a"].dn},
                           files=_swan_files(pki, pki["root"])) as swan:  # fmt: skip
            d = Daemon(pair.a, path)
            try:
                nsutil.wait_for(d.started, timeout=20, what=f"ipsecstack to start\n{d.output()}")
                if initiator == "strongswan":
                    swan.initiate("net")
                nsutil.wait_for(lambda: "child sa installed" in d.output(), timeout=30,
                                what=f"ipsecstack child SA:\n{d.output()}\n{swan.log_tail(60)}")  # fmt: skip
                ike_sa, _ = swan.wait_established(timeout=15)
                assert ike_sa.info["remote-id"] == pki["a"].dn, ike_sa.info
                out = d.output()
                assert "peer_cert_issuer" in out and "Interop Root CA" in out, out
                assert "RFC 7427" in out, out  # strongSwan announces hashes: both sides use RFC 7427 signatures
                _ping(pair, "10.1.0.1", "10.2.0.1")
                assert "PRIVATE KEY" not in out
                (sa,) = json.loads(cli("list-sas", "--socket", str(tmp_path / "c.sock"), "--json").stdout)
                assert sa["remote_id"] == pki["b"].dn and sa["remote_cert"] == pki["b"].dn, sa
                assert sa["local_id"] == pki["a"].dn and "RFC 7427" in sa["remote_auth"], sa
                human = cli("list-sas", "--socket", str(tmp_path / "c.sock")).stdout
                assert f"authenticated by {sa['remote_auth']}, certificate {pki['b'].dn!r}" in human, human
            finally:
                rc = d.terminate()
            assert rc == 0, d.output()


@pytest.mark.parametrize("who", ["ipsecstack-refuses", "strongswan-refuses"])
def test_untrusted_certificate_is_refused(who: str, tmp_path: Path) -> None:
    _require()
    pki = _pki("ecdsa256", "ecdsa256")
    stranger = issue("Stranger Root CA", ca=True)
    if who == "ipsecstack-refuses":
        pki["b"] = issue("strongswan-b", stranger)  # strongSwan's certificate from a CA ipsecstack does not trust
        anchor = pki["root"]
    else:
        anchor = stranger  # strongSwan trusts only the stranger
    with nsutil.netns_pair("iu") as pair:
        _lan(pair.b, "10.2.0.1/16")
        path = _write_ours(tmp_path, pki, CONFIG.format(local=pair.addr_a, remote=pair.addr_b, swan_dn=pki["b"].dn,
                                                        start="start", sock=tmp_path / "c.sock"))  # fmt: skip
        with sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, psk="unused", local_ts="10.2.0.0/16",
                           remote_ts="10.1.0.0/16", conn="swan", child="net", plugins=PLUGINS,
                           local_auth={"auth": "pubkey", "certs": "b.pem"},
                           remote_auth={"auth": "pubkey", "id": pki["a"].dn},
                           files=_swan_files(pki, anchor)) as swan:  # fmt: skip
            d = Daemon(pair.a, path)
            try:
                want = "no trusted CA issued" if who == "ipsecstack-refuses" else "AUTHENTICATION_FAILED"
                nsutil.wait_for(lambda: want in d.output(), timeout=30,
                                what=f"{want!r} in ipsecstack's log\n{d.output()}\n{swan.log_tail(60)}")  # fmt: skip
                assert "child sa installed" not in d.output()
                assert swan.established() is None
            finally:
                d.terminate()
