"""``ipsecstack import-swanctl``: strongSwan configurations converted, and what is not, listed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipsecstack.config import parse as parse_config
from ipsecstack.ike.const import IdType
from ipsecstack.swanctl_import import SwanctlSyntaxError, convert, parse

SITE = """
# a site-to-site PSK tunnel as strongSwan's documentation writes them
connections {
    site-b {
        version = 2
        local_addrs  = 192.0.2.1
        remote_addrs = 192.0.2.2
        proposals = aes128gcm16-prfsha256-x25519, aes256-sha256-modp2048
        dpd_delay = 30s
        unique = replace
        over_time = 20m
        rand_time = 5m
        reauth_time = 3h
        mobike = no
        local {
            auth = psk
            id = a.example
        }
        remote { auth = psk
            id = b.example }
        children {
            net {
                local_ts  = 10.1.0.0/16
                remote_ts = 10.2.0.0/16,10.3.0.0/16
                esp_proposals = aes128gcm16
                rekey_time = 1h
                start_action = start
                close_action = trap
                dpd_action = restart
                updown = /usr/local/libexec/ipsec/_updown iptables
            }
        }
    }
}
secrets {
    ike-site-b {
        id-a = a.example
        id-b = b.example
        secret = "a # that is not a comment"
    }
}
pools {
    rw { addrs = 10.9.0.0/24 }
}
"""


def test_site_to_site_converts_and_loads() -> None:
    result = convert(SITE)
    assert sorted(result.skipped) == [
        "connections.site-b.children.net.updown", "connections.site-b.mobike", "pools",
    ]  # fmt: skip
    cfg = parse_config(result.toml)
    (peer,) = cfg.connections
    assert (peer.name, peer.local_addr, peer.remote_addr) == ("site-b", "192.0.2.1", "192.0.2.2")
    assert [p.text for p in peer.proposals] == ["aes128gcm16-prfsha256-x25519", "aes256-sha256-modp2048"]
    assert peer.local_id == (IdType.ID_FQDN, b"a.example") and peer.remote_id == (IdType.ID_FQDN, b"b.example")
    assert peer.psk == b"a # that is not a comment" and peer.dpd_delay == 30.0
    (child,) = peer.children
    assert [str(r) for r in child.remote_ts] == ["10.2.0.0/16", "10.3.0.0/16"] and child.rekey_time == 3600.0
    assert (child.close_action, child.dpd_action, peer.unique, peer.over_time) == ("trap", "restart", "replace", 1200.0)
    assert peer.reauth_time == 10800.0 and "connections.site-b.reauth_time" not in result.skipped
    assert peer.rand_time == 300.0
    assert cfg.start == ["site-b"]


def test_syntax_errors_name_the_line() -> None:
    with pytest.raises(SwanctlSyntaxError, match="line 3"):
        parse("connections {\n  a {\n    ??? weird\n  }\n}\n")
    with pytest.raises(SwanctlSyntaxError, match="not closed"):
        parse("connections {\n")
    with pytest.raises(SwanctlSyntaxError, match="without an open section"):
        parse("}\n")


def test_strongswans_own_reference_config_parses() -> None:
    """Debian's /etc/swanctl/swanctl.conf documents every option, commented out: uncommented, it must
    parse, and everything without an equivalent must be reported."""
    ref = Path("/etc/swanctl/swanctl.conf")
    if not ref.exists():
        pytest.skip("strongSwan's reference swanctl.conf is not installed (deploy/setup.sh test installs it)")
    lines = []
    for raw in ref.read_text().splitlines():
        m = re.match(r"^(\s*)#\s?(\s*)(.*)$", raw)
        if m and re.match(r"^([A-Za-z0-9_.\-<>%]+\s*(=|\{)|\})", m.group(3)):
            lines.append(m.group(1) + m.group(2) + m.group(3))
    result = convert("\n".join(lines))
    for expected in ("pools", "authorities", "connections.<conn>.mobike", "connections.<conn>.vips"):
        assert expected in result.skipped
    assert "[connections.<conn>]" not in result.toml  # odd names are quoted
    assert '[connections."<conn>"]' in result.toml


def test_cli(tmp_path: Path) -> None:
    f = tmp_path / "swanctl.conf"
    f.write_text(SITE)
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "import-swanctl", str(f)], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "[connections.site-b]" in r.stdout
    assert "not converted: pools" in r.stderr
    (tmp_path / "out.toml").write_text(r.stdout)
    check = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(tmp_path / "out.toml")],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert check.returncode == 0, check.stderr
    f.write_text("connections {\n")
    bad = subprocess.run([sys.executable, "-m", "ipsecstack", "import-swanctl", str(f)], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "not closed" in bad.stderr


CERT_SITE = """
connections {
    gw {
        local_addrs = 192.0.2.1
        remote_addrs = 192.0.2.2
        send_certreq = no
        local {
            auth = pubkey
            certs = moonCert.pem
        }
        remote {
            auth = ecdsa-sha256
            id = "C=CH, O=ipsecstack test, CN=sun.example"
            cacerts = caCert.pem
        }
        children {
            net {
                local_ts = 10.1.0.0/16
                remote_ts = 10.2.0.0/16
            }
        }
    }
}
secrets {
    private-moon {
        file = moonKey.pem
    }
}
"""


def test_certificates_convert_into_a_swanctl_directory(tmp_path: Path) -> None:
    from tests.pkiutil import issue

    ca = issue("CA", ca=True)
    moon = issue("moon.example", ca)
    for sub, name, data in (("x509", "moonCert.pem", moon.pem()), ("x509ca", "caCert.pem", ca.pem()),
                            ("private", "moonKey.pem", moon.key_pem())):  # fmt: skip
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_bytes(data)
    result = convert(CERT_SITE)
    assert 'certs = ["x509/moonCert.pem"]' in result.toml and 'cacerts = ["x509ca/caCert.pem"]' in result.toml
    assert '[secrets.private.moon]\nfile = "private/moonKey.pem"' in result.toml
    assert "send_certreq = false" in result.toml
    assert any("ecdsa-sha256 (converted to pubkey" in s for s in result.skipped)
    (tmp_path / "ipsecstack.toml").write_text(result.toml)
    check = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(tmp_path / "ipsecstack.toml")],
                           capture_output=True, text=True, timeout=30, cwd="/")  # fmt: skip
    assert check.returncode == 0, check.stderr + result.toml


def test_ah_proposals_convert_and_need_raw_ip() -> None:
    ah_site = SITE.replace("esp_proposals = aes128gcm16", "ah_proposals = sha256-x25519, sha512")
    result = convert(ah_site)
    assert 'ah_proposals = ["sha256-x25519", "sha512"]' in result.toml and "esp_proposals" not in result.toml
    assert 'outer_backend = "raw"' in result.toml and 'outer_backend = "udp"' not in result.toml
    cfg = parse_config(result.toml)
    (child,) = cfg.connections[0].children
    assert child.protocol == "ah" and [p.text for p in child.proposals] == ["sha256-x25519", "sha512"]
    # both: strongSwan offers either protocol; an ipsecstack child negotiates one, and ESP is kept
    both = convert(SITE.replace("esp_proposals = aes128gcm16", "esp_proposals = aes128gcm16\nah_proposals = sha256"))
    assert "connections.site-b.children.net.ah_proposals (esp_proposals given too: ESP is kept)" in both.skipped
    assert 'outer_backend = "udp"' in both.toml
    assert parse_config(both.toml).connections[0].children[0].protocol == "esp"
