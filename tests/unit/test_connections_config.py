"""[connections]/[secrets]: every validation error names the key path and says how to fix it."""

from __future__ import annotations

from pathlib import Path

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
         "connections.gw.local.certs", "needs certs"),
        (('local = { auth = "psk", id = "a.example" }', 'local = { auth = "eap-mschapv2", id = "a.example" }'),
         "connections.gw.local.auth", "psk or pubkey"),
        (('remote = { auth = "psk", id = "b.example" }', 'remote = { auth = "pubkey", id = "b.example" }'),
         "connections.gw.remote.cacerts", "trust anchors"),
        (('remote = { auth = "psk", id = "b.example" }', 'remote = { auth = "psk", id = "CN=b, X=y" }'),
         "connections.gw.remote.id", "distinguished name"),
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


def test_replay_window_applies() -> None:
    cfg = parse(GOOD.replace('start_action = "start"', 'start_action = "start"\nreplay_window = 1024'))
    assert cfg.connections[0].children[0].replay_window == 1024 and cfg.notices == []
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace('start_action = "start"', 'start_action = "start"\nreplay_window = 8'))
    assert e.value.field == "connections.gw.children.net.replay_window"


def _script(tmp_path: Path, mode: int = 0o755) -> Path:
    f = tmp_path / "updown.sh"
    f.write_text("#!/bin/sh\nexit 0\n")
    f.chmod(mode)
    return f


def test_actions_unique_over_time_and_updown_apply(tmp_path: Path) -> None:
    """These swanctl keys have an effect now: parsed into the configuration, never reported as notices."""
    script = _script(tmp_path)
    text = GOOD.replace('dpd_delay = "30s"', 'dpd_delay = "30s"\nunique = "replace"\nover_time = "15m"').replace(
        'start_action = "start"', f'start_action = "start"\nupdown = "{script} iptables"\n'
        'close_action = "trap"\ndpd_action = "restart"'
    )  # fmt: skip
    cfg = parse(text)
    (peer,) = cfg.connections
    (child,) = peer.children
    assert cfg.notices == []
    assert (peer.unique, peer.over_time) == ("replace", 900.0)
    assert (child.close_action, child.dpd_action, child.updown) == ("trap", "restart", (str(script), "iptables"))
    # the defaults are strongSwan's; over_time None means 10% of rekey_time (session.py)
    (peer,) = parse(GOOD).connections
    assert (peer.unique, peer.over_time, peer.children[0].close_action, peer.children[0].dpd_action,
            peer.children[0].updown) == ("no", None, "none", "clear", ())  # fmt: skip
    # strongSwan's synonyms are accepted
    child = parse(GOOD.replace('start_action = "start"', 'start_action = "start"\nclose_action = "restart"\n'
                               'dpd_action = "route"')).connections[0].children[0]  # fmt: skip
    assert (child.close_action, child.dpd_action) == ("start", "trap")


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        ('close_action = "hold"', "connections.gw.children.net.close_action", "use none, trap, start"),
        ('dpd_action = "hold"', "connections.gw.children.net.dpd_action", "use clear, trap, restart"),
        ("dpd_action = true", "connections.gw.children.net.dpd_action", "use clear"),
        ('updown = ""', "connections.gw.children.net.updown", "absolute path of an executable"),
        ("updown = 5", "connections.gw.children.net.updown", "absolute path of an executable"),
        ('updown = "updown.sh"', "connections.gw.children.net.updown", "give an absolute path"),
        ('updown = "/nonexistent/updown.sh"', "connections.gw.children.net.updown", "no such file"),
        ('updown = "/tmp/x \'unbalanced"', "connections.gw.children.net.updown", "cannot split"),
        ("NOEXEC", "connections.gw.children.net.updown", "chmod +x"),
        ('unique = "yes"', "connections.gw.unique", "no (the default), never, replace or keep"),
        ('over_time = "soon"', "connections.gw.over_time", "duration"),
        ('over_time = "0s"', "connections.gw.over_time", "positive duration"),
        ('over_time = "10m"\nrekey_time = 0', "connections.gw.over_time", "rekey_time = 0"),
    ],
)  # fmt: skip
def test_action_and_lifetime_errors(change: str, path: str, hint: str, tmp_path: Path) -> None:
    if change == "NOEXEC":
        change = f'updown = "{_script(tmp_path, 0o644)}"'
    if path.startswith("connections.gw.children"):
        text = GOOD.replace('start_action = "start"', f'start_action = "start"\n{change}')
    else:
        text = GOOD.replace('dpd_delay = "30s"', f'dpd_delay = "30s"\n{change}')
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.field == path, str(e.value)
    assert hint in str(e.value), str(e.value)


@pytest.mark.parametrize("change", ['close_action = "start"', 'close_action = "trap"', 'dpd_action = "restart"',
                                    'dpd_action = "trap"'])  # fmt: skip
def test_actions_that_negotiate_need_a_peer_address(change: str) -> None:
    text = GOOD.replace('remote_addrs = ["192.0.2.2"]', 'remote_addrs = ["%any"]').replace(
        'start_action = "start"', f'start_action = "none"\n{change}'
    )
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.field == "connections.gw.remote_addrs" and "give a remote address" in str(e.value)
    parse(text.replace(change, 'close_action = "none"\ndpd_action = "clear"'))  # these need none


def test_check_prints_the_notices(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    f = tmp_path / "c.toml"
    f.write_text(GOOD.replace('dpd_delay = "30s"', 'dpd_delay = "30s"\nsend_certreq = false'))
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(f)], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0 and "no effect" not in r.stderr, r.stderr  # send_certreq is applied now


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
