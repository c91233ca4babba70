"""[connections]/[secrets]: every validation error names the key path and says how to fix it."""

from __future__ import annotations

import pytest

from ipsecstack.config import parse
from ipsecstack.errors import ConfigError

GOOD = """
[connections.gw]
local_addrs = ["192.0.2.1"]
remote_addrs = ["192.0.2.2"]
proposals = ["aes128gcm16-prfsha256-x25519"]
dpd_delay = "30s"
local = { auth = "psk", id = "a.example" }
remote = { auth = "psk", id = "b.example" }

[connections.gw.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
esp_proposals = ["aes128gcm16-x25519"]
start_action = "start"

[secrets.ike.gw]
secret = "s3cret-value"
"""


def test_good() -> None:
    cfg = parse(GOOD)
    (peer,) = cfg.connections
    assert peer.dpd_delay == 30.0 and cfg.start == ["gw"] and cfg.trap == ["gw"]
    assert peer.children[0].proposals[0].dh[0].keyword == "curve25519"  # PFS for rekeys


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        (('local_addrs = ["192.0.2.1"]', 'local_addrs = ["192.0.2.1", "192.0.2.9"]'), "connections.gw.local_addrs",
         "exactly one"),
        (('remote_addrs = ["192.0.2.2"]', 'remote_addrs = ["nowhere"]'), "connections.gw.remote_addrs", "%any"),
        (('proposals = ["aes128gcm16-prfsha256-x25519"]', 'proposals = ["aes128gcm16-prfsha256"]'),
         "connections.gw.proposals[0]", "key exchange group"),
        (('proposals = ["aes128gcm16-prfsha256-x25519"]', 'proposals = ["aes128gcm16-x25519"]'),
         "connections.gw.proposals[0]", "PRF"),
        (('proposals = ["aes128gcm16-prfsha256-x25519"]', 'proposals = ["3des-md5-modp1024"]'),
         "connections.gw.proposals[0]", "unknown algorithm"),
        (('dpd_delay = "30s"', 'dpd_delay = "soon"'), "connections.gw.dpd_delay", "duration"),
        (('dpd_delay = "30s"', "mobike = true"), "connections.gw.mobike", "not supported"),
        (('dpd_delay = "30s"', "version = 1"), "connections.gw.version", "IKEv2"),
        (('dpd_delay = "30s"', "aggressive = true"), "connections.gw.aggressive", "unknown key"),
        (('local = { auth = "psk", id = "a.example" }', 'local = { auth = "pubkey", id = "a.example" }'),
         "connections.gw.local.auth", "psk"),
        (('local = { auth = "psk", id = "a.example" }', 'local = { auth = "psk", idd = "a.example" }'),
         "connections.gw.local.idd", "unknown key"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'esp_proposals = ["aes128gcm16-prfsha256"]'),
         "connections.gw.children.net.esp_proposals[0]", "no PRF"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["sha256"]'),
         "connections.gw.children.net.ah_proposals", "AH"),
        (('start_action = "start"', 'start_action = "always"'), "connections.gw.children.net.start_action",
         "none, start or trap"),
        (('remote_ts = ["10.2.0.0/16"]', 'remote_ts = ["10.2.0.0/99"]'), "connections.gw.children.net.remote_ts[0]",
         "CIDR"),
        (('start_action = "start"', 'mode = "beet"'), "connections.gw.children.net.mode", "tunnel or transport"),
        (('secret = "s3cret-value"', 'secret_env = "NO_SUCH_VARIABLE"'), "secrets.ike.gw.secret_env", "not set"),
        (('secret = "s3cret-value"', 'secret = "0xzz"'), "secrets.ike.gw.secret", "hex"),
        (('[secrets.ike.gw]\nsecret = "s3cret-value"', ""), "secrets.ike.gw", "pre-shared key"),
        (('[connections.gw.children.net]', '[connections.gw.kids.net]'), "connections.gw.kids", "unknown key"),
    ],
)  # fmt: skip
def test_errors(change: tuple[str, str], path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace(*change), env={})
    assert e.value.field == path, str(e.value)
    assert hint in str(e.value)
    assert "s3cret-value" not in str(e.value)


def test_trap_needs_a_peer_address() -> None:
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace('remote_addrs = ["192.0.2.2"]', 'remote_addrs = ["%any"]'))
    assert e.value.field == "connections.gw.remote_addrs" and "starts itself" in str(e.value)


def test_keys_without_effect_are_reported_not_silent() -> None:
    text = GOOD.replace('dpd_delay = "30s"', 'dpd_delay = "30s"\nunique = "replace"').replace(
        'start_action = "start"', 'start_action = "start"\nupdown = "/bin/true"\nreplay_window = 1024'
    )
    cfg = parse(text)
    assert cfg.notices == ["connections.gw.unique", "connections.gw.children.net.updown"]
    assert cfg.connections[0].children[0].replay_window == 1024  # this one is applied
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace('start_action = "start"', 'start_action = "start"\nreplay_window = 8'))
    assert e.value.field == "connections.gw.children.net.replay_window"


def test_check_prints_the_notices(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    f = tmp_path / "c.toml"
    f.write_text(GOOD.replace('dpd_delay = "30s"', 'dpd_delay = "30s"\nsend_certreq = false'))
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(f)], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0 and "connections.gw.send_certreq is accepted but has no effect yet" in r.stderr


def test_pools_and_vips() -> None:
    text = (
        GOOD.replace('remote_addrs = ["192.0.2.2"]', 'remote_addrs = ["%any"]\npools = ["rw"]').replace(
            'start_action = "start"', 'start_action = "none"'
        )
        + '\n[pools.rw]\naddrs = "10.9.0.10-10.9.0.20"\ndns = ["10.1.0.53"]\n'
    )
    text = text.replace('remote_ts = ["10.2.0.0/16"]\n', "")
    (peer,) = parse(text).connections
    (pool,) = peer.pools
    assert (str(pool.first), str(pool.last), [str(d) for d in pool.dns]) == ("10.9.0.10", "10.9.0.20", ["10.1.0.53"])
    assert [str(r) for r in peer.children[0].remote_ts] == ["0.0.0.0/0"]  # narrowed to each client's address
    with pytest.raises(ConfigError) as e:
        parse(text.replace('pools = ["rw"]', 'pools = ["nope"]'))
    assert e.value.field == "connections.gw.pools[0]"
    with pytest.raises(ConfigError) as e:
        parse(text.replace('"10.9.0.10-10.9.0.20"', '"10.9.0.20-10.9.0.10"'))
    assert e.value.field == "pools.rw.addrs"
    client = parse(GOOD.replace('dpd_delay = "30s"', 'vips = ["0.0.0.0"]')).connections[0]
    assert client.request_vip
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0"):
        parse(GOOD.replace('dpd_delay = "30s"', 'vips = ["10.9.0.5"]'))


def test_child_lifetimes() -> None:
    text = GOOD.replace('start_action = "start"', 'start_action = "start"\nlife_time = "2h"\nrekey_bytes = "500M"\n'
                        "rekey_packets = 1000000")  # fmt: skip
    child = parse(text).connections[0].children[0]
    assert (child.life_time, child.rekey_bytes, child.rekey_packets) == (7200.0, 500 << 20, 1000000)
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace('start_action = "start"', 'start_action = "start"\nlife_time = "30m"'))
    assert e.value.field == "connections.gw.children.net.life_time" and "longer than rekey_time" in str(e.value)
