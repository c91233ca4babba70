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
        # AH children (ah_proposals, RFC 4302): integrity only, one protocol per child, never across a NAT
        (('esp_proposals = ["aes128gcm16-x25519"]', 'esp_proposals = ["aes128gcm16"]\nah_proposals = ["sha256"]'),
         "connections.gw.children.net.ah_proposals", "not both"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["aes128gcm16"]'),
         "connections.gw.children.net.ah_proposals[0]", "AH authenticates only"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["aes256-sha256"]'),
         "connections.gw.children.net.ah_proposals[0]", "remove aes256"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["x25519"]'),
         "connections.gw.children.net.ah_proposals[0]", "integrity algorithm"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["sha256-prfsha256"]'),
         "connections.gw.children.net.ah_proposals[0]", "no PRF"),
        (('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["sha1"]'),
         "connections.gw.children.net.ah_proposals[0]", "unknown algorithm 'sha1'; known: curve25519"),
        (('esp_proposals = ["aes128gcm16-x25519"]', "ah_proposals = []"),
         "connections.gw.children.net.ah_proposals", "at least one"),
        (('esp_proposals = ["aes128gcm16-x25519"]', "ah_proposals = 5"),
         "connections.gw.children.net.ah_proposals", "list of strings"),
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


AH = GOOD.replace('esp_proposals = ["aes128gcm16-x25519"]', 'ah_proposals = ["sha256-x25519", "sha512-esn"]')


def test_ah_proposals() -> None:
    from ipsecstack.ike.const import Protocol

    (child,) = parse(AH).connections[0].children
    assert (child.protocol, child.ike_protocol) == ("ah", Protocol.AH)
    first, second = child.proposals
    assert first.protocol == second.protocol == Protocol.AH and first.encr == second.encr == ()
    assert [i.keyword for i in first.integ] == ["sha256"] and first.dh[0].keyword == "curve25519"
    assert [i.keyword for i in second.integ] == ["sha512"] and second.esn == (True,) and second.dh == ()
    assert parse(GOOD).connections[0].children[0].protocol == "esp"


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        (('dpd_delay = "30s"', 'dpd_delay = "30s"\nencap = true'), "connections.gw.encap", "RFC 3948 carries ESP only"),
        (("[connections.gw]", '[agent]\nouter_backend = "udp"\n\n[connections.gw]'), "agent.outer_backend",
         'ah_proposals needs IP protocol 51, which the udp backend cannot carry (ESP in UDP only, RFC 3948): use '
         'outer_backend = "raw"'),
    ],
)  # fmt: skip
def test_ah_cannot_be_encapsulated(change: tuple[str, str], path: str, hint: str) -> None:
    """AH authenticates the outer IP header (RFC 4302): it cannot cross a NAT, nor ride in UDP."""
    with pytest.raises(ConfigError) as e:
        parse(AH.replace(*change), env={})
    assert e.value.field == path and hint in str(e.value), str(e.value)
    parse(GOOD.replace(*change), env={})  # the same with ESP is fine


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


@pytest.mark.parametrize(("line", "want"), [("", None), ('rand_time = "0"', 0.0), ('rand_time = "5m"', 300.0),
                                           ('rand_time = 30\nrekey_time = 0', 30.0)])  # fmt: skip
def test_rand_time(line: str, want: float | None) -> None:
    """strongSwan's rand_time: the most a rekey/reauthentication starts early (0: never); unset, 10% of the time."""
    (peer,) = parse(GOOD.replace('dpd_delay = "30s"', f'dpd_delay = "30s"\n{line}')).connections
    assert peer.rand_time == want


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
        ('rand_time = "soon"', "connections.gw.rand_time", "duration like 30s"),
        ("rand_time = -1", "connections.gw.rand_time", "duration like 30s"),
        ('rand_time = "4h"', "connections.gw.rand_time", "shorter than rekey_time (14400s)"),
        ('rand_time = "2h"\nreauth_time = "1h"', "connections.gw.rand_time", "shorter than reauth_time (3600s)"),
        ('reauth_time = "soon"', "connections.gw.reauth_time", "duration like 30s"),
        ("reauth_time = -5", "connections.gw.reauth_time", "duration like 30s"),
        ("reauth_time = true", "connections.gw.reauth_time", "duration like 30s"),
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


def test_reauth_time_applies() -> None:
    """strongSwan's reauth_time: a duration, 0 (the default) turns it off; independent of rekey_time."""
    (peer,) = parse(GOOD).connections
    assert peer.reauth_time is None
    for value, want in (('"2h"', 7200.0), ("90", 90.0), ('"0s"', None), ("0", None)):
        (peer,) = parse(GOOD.replace('dpd_delay = "30s"', f'dpd_delay = "30s"\nreauth_time = {value}')).connections
        assert peer.reauth_time == want, value
    text = GOOD.replace('dpd_delay = "30s"', 'dpd_delay = "30s"\nreauth_time = "4h"\nrekey_time = "1h"')
    cfg = parse(text)
    assert (cfg.connections[0].reauth_time, cfg.connections[0].rekey_time, cfg.notices) == (14400.0, 3600.0, [])


def test_reauth_time_needs_a_peer_address() -> None:
    text = GOOD.replace('remote_addrs = ["192.0.2.2"]', 'remote_addrs = ["%any"]\nreauth_time = "1h"')
    text = text.replace('start_action = "start"', 'start_action = "none"')
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.field == "connections.gw.reauth_time" and "remote_addrs" in str(e.value)
    assert parse(text.replace('reauth_time = "1h"', 'reauth_time = "0"')).connections[0].reauth_time is None


PROFILES = """
[pools.a]
addrs = "10.9.1.0/24"

[pools.b]
addrs = "10.9.2.0/24"

[connections.group-a]
local_addrs = ["192.0.2.1"]
pools = ["a"]
local = { auth = "psk", id = "gw.example" }
remote = { auth = "psk", id = "*@a.example" }
children.net.local_ts = ["10.1.0.0/16"]

[connections.group-b]
local_addrs = ["192.0.2.1"]
pools = ["b"]
local = { auth = "psk", id = "gw.example" }
remote = { auth = "psk", id = "carol@b.example" }
children.net.local_ts = ["10.2.0.0/16"]

[secrets.ike.first]
id = ["gw.example", "*@a.example"]
secret = "secret of a"

[secrets.ike.second]
id = ["gw.example", "carol@b.example"]
secret = "secret of b"
"""


def test_remote_access_profiles() -> None:
    from ipsecstack.ike.session import identity

    a, b = parse(PROFILES, env={}).connections
    assert (a.name, a.remote_addr, a.remote_id) == ("group-a", None, identity("*@a.example"))
    assert [str(p.first) for p in a.pools] == ["10.9.1.1"] and [str(p.first) for p in b.pools] == ["10.9.2.1"]
    # each connection's secret is the one naming both of its identities, not the first naming one of them
    assert (a.psk, b.psk) == (b"secret of a", b"secret of b")
    # a secret named like the connection comes first
    named = PROFILES + '\n[secrets.ike.group-b]\nsecret = "by name"\n'
    assert parse(named, env={}).connections[1].psk == b"by name"
    with pytest.raises(ConfigError) as e:
        parse(PROFILES.replace('id = "gw.example" }\nremote = { auth = "psk", id = "*@a', 'id = "*.example" }\n'
                               'remote = { auth = "psk", id = "*@a'), env={})  # fmt: skip
    assert e.value.field == "connections.group-a.local.id" and "remote.id" in str(e.value)
