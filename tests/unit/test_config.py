"""Manual-keying configuration: parsing, SA/policy construction, and every error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipsecstack.config import build_datapath, manual_policies, manual_sas, parse, parse_duration, parse_size, parse_ts
from ipsecstack.errors import ConfigError
from ipsecstack.spd import Action

GOOD = """
[agent]
inner_backend = "tun"
outer_backend = "udp"
tun_addrs = ["10.1.0.1/16"]

[manual.site-b]
mode = "tunnel"
transform = "aes256gcm16"
local_addrs = "172.31.0.1"
remote_addrs = ["172.31.0.2"]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16", "10.3.0.0/16[tcp/443]"]
spi_in = 0x2001
spi_out = 0x1001
key_in = "{k}"
key_out_env = "KEY_OUT"
encap = true
life_time = "1h"
"""
K36 = "ab" * 36


def test_good_config() -> None:
    cfg = parse(GOOD.format(k=K36), env={"KEY_OUT": "cd" * 36})
    assert cfg.agent.outer_backend == "udp" and cfg.agent.tun_addrs == ["10.1.0.1/16"]
    (c,) = cfg.manual
    assert c.remote_addr == "172.31.0.2" and c.encap and c.hard.seconds == 3600
    out, inb = manual_sas(c)
    assert (out.spi, out.direction, out.tunnel_dst, out.udp_encap) == (0x1001, "out", "172.31.0.2", (4500, 4500))
    assert (inb.spi, inb.direction, inb.tunnel_dst) == (0x2001, "in", "172.31.0.1")
    pols = manual_policies(c)
    assert [(p.direction, str(p.selector)) for p in pols] == [
        ("out", "10.1.0.0/16 -> 10.2.0.0/16"),
        ("in", "10.2.0.0/16 -> 10.1.0.0/16"),
        ("out", "10.1.0.0/16 -> 10.3.0.0/16:443 proto 6"),
        ("in", "10.3.0.0/16:443 -> 10.1.0.0/16 proto 6"),
    ]
    assert all(p.action is Action.PROTECT for p in pols)
    dp = build_datapath(cfg, 0.0)
    assert len(dp.sad) == 2 and len(dp.spd) == 4


def test_transport_defaults_to_host_selectors() -> None:
    text = """
[manual.h]
mode = "transport"
protocol = "ah"
local_addrs = "172.31.0.1"
remote_addrs = "172.31.0.2"
spi_in = 0x300
spi_out = 0x301
key_in = "{k}"
key_out = "{k}"
""".format(k="00" * 32)
    (c,) = parse(text).manual
    assert c.transform == "sha256"
    assert [str(p.selector) for p in manual_policies(c)] == [
        "172.31.0.1/32 -> 172.31.0.2/32",
        "172.31.0.2/32 -> 172.31.0.1/32",
    ]


@pytest.mark.parametrize(
    ("change", "path", "hint"),
    [
        (("spi_in = 0x2001", "spi_in = 5"), "manual.site-b.spi_in", "reserved"),
        (('local_addrs = "172.31.0.1"', 'local_addrs = "172.31.0.300"'), "manual.site-b.local_addrs", "IPv4"),
        (('"10.3.0.0/16[tcp/443]"', '"10.3.0.0/33"'), "manual.site-b.remote_ts[1]", "CIDR"),
        (('"10.3.0.0/16[tcp/443]"', '"10.3.0.0/16[tcp/http]"'), "manual.site-b.remote_ts[1]", "ports"),
        (('transform = "aes256gcm16"', 'transform = "aes256gcm12"'), "manual.site-b.transform", "unknown"),
        (('transform = "aes256gcm16"', 'transform = "aes128gcm16"'), "manual.site-b.key_in", "20 bytes"),
        (("encap = true", "encap = 1"), "manual.site-b.encap", "true or false"),
        (("encap = true", "encapsulation = true"), "manual.site-b.encapsulation", "unknown key"),
        (('life_time = "1h"', 'life_time = "1 hour"'), "manual.site-b.life_time", "duration"),
        (('mode = "tunnel"', 'mode = "tunel"'), "manual.site-b.mode", "tunnel or transport"),
        (('outer_backend = "udp"', 'outer_backend = "tcp"'), "agent.outer_backend", "raw"),
        (('tun_addrs = ["10.1.0.1/16"]', 'tun_addrs = ["10.1.0.1/40"]'), "agent.tun_addrs[0]", "prefix"),
        (('key_out_env = "KEY_OUT"', 'key_out_env = "NOT_SET"'), "manual.site-b.key_out_env", "not set"),
        (('key_in = "{k}"', 'key_in = "zz"'), "manual.site-b.key_in", "hex"),
        (('key_in = "{k}"', ""), "manual.site-b.key_in", "exactly one"),
        (('local_ts = ["10.1.0.0/16"]', ""), "manual.site-b.local_ts", "subnets"),
    ],
)
def test_errors_name_the_key_path(change: tuple[str, str], path: str, hint: str) -> None:
    text = GOOD.replace(*change).format(k=K36)
    with pytest.raises(ConfigError) as e:
        parse(text, env={"KEY_OUT": "cd" * 36})
    assert e.value.field == path, str(e.value)
    assert hint in str(e.value)


def test_secrets_never_in_error_messages() -> None:
    secret = "a1b2c3d4" * 5 + "ee"  # 21 bytes: wrong for aes128gcm16
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace('transform = "aes256gcm16"', 'transform = "aes128gcm16"').format(k=secret),
              env={"KEY_OUT": secret})  # fmt: skip
    assert secret not in str(e.value)


def test_not_toml_and_missing_sections() -> None:
    with pytest.raises(ConfigError, match="TOML"):
        parse("[manual")
    with pytest.raises(ConfigError, match="manual"):
        parse("[agent]\n")
    with pytest.raises(ConfigError, match="local_addrs"):
        parse("[connections.x]\n")
    with pytest.raises(ConfigError, match="pools"):
        parse("[pools.p]\n")


def test_units() -> None:
    assert parse_duration("10m", "x") == 600 and parse_duration(30, "x") == 30
    assert parse_size("2M", "x") == 2 << 20 and parse_size(7, "x") == 7
    sel = parse_ts("192.0.2.0/24[udp/1000-2000]", "x")
    assert sel.proto == 17 and sel.dport == (1000, 2000)
    with pytest.raises(ConfigError):
        parse_ts("dynamic", "x")


def test_shipped_examples_are_valid() -> None:
    from pathlib import Path

    from ipsecstack.config import load

    examples = sorted((Path(__file__).parents[2] / "deploy" / "examples").glob("*.toml"))
    assert examples
    for path in examples:  # the secrets they name are shipped next to them (deploy/examples/make-secrets.sh)
        cfg = load(str(path), {})
        assert (cfg.manual or cfg.connections) and not cfg.warnings, path


def test_agent_user() -> None:
    """``[agent] user``: an existing unprivileged account; unknown users and root are refused at check time."""
    import pwd

    with_user = GOOD.replace("[agent]\n", '[agent]\nuser = "{user}"\n', 1)
    env = {"KEY_OUT": "cd" * 36}
    assert parse(GOOD.format(k=K36), env=env).agent.user is None
    nobody = pwd.getpwnam("nobody")  # present on every Debian/Ubuntu system
    assert parse(with_user.format(k=K36, user="nobody"), env=env).agent.user == nobody.pw_name
    with pytest.raises(ConfigError) as e:
        parse(with_user.format(k=K36, user="no-such-user-ipsecstack"), env=env)
    assert (e.value.field, e.value.value) == ("agent.user", "no-such-user-ipsecstack")
    assert "no such user" in e.value.fix and "useradd" in e.value.fix
    assert str(e.value).startswith("agent.user = 'no-such-user-ipsecstack': ")
    with pytest.raises(ConfigError) as e:
        parse(with_user.format(k=K36, user="root"), env=env)
    assert e.value.field == "agent.user" and "remove agent.user" in e.value.fix
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace("[agent]\n", "[agent]\nuser = 65534\n", 1).format(k=K36), env=env)
    assert e.value.field == "agent.user" and "user name" in e.value.fix


def test_check_reports_unknown_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ipsecstack check`` exits 2 naming agent.user, the value and the fix."""
    from ipsecstack.cli import main

    path = tmp_path / "c.toml"
    text = GOOD.replace("[agent]\n", '[agent]\nuser = "no-such-user-ipsecstack"\n', 1)
    path.write_text(text.replace('key_out_env = "KEY_OUT"', f'key_out = "{"cd" * 36}"').format(k=K36))
    assert main(["check", "-c", str(path)]) == 2
    assert "agent.user = 'no-such-user-ipsecstack': no such user" in capsys.readouterr().err
    path.write_text(path.read_text().replace("no-such-user-ipsecstack", "nobody"))
    assert main(["check", "-c", str(path)]) == 0


def test_agent_codel_and_tun_queue() -> None:
    """``[agent] codel_target_ms`` / ``codel_interval_ms`` (RFC 8289 defaults), ``tun_txqueuelen``, ``tun_queue_kb``."""
    env = {"KEY_OUT": "cd" * 36}
    a = parse(GOOD.format(k=K36), env=env).agent
    assert (a.codel_target_ms, a.codel_interval_ms, a.tun_txqueuelen, a.tun_queue_kb) == (5.0, 100.0, None, 1024)
    keys = "codel_target_ms = 2\ncodel_interval_ms = 40.5\ntun_txqueuelen = 16\n"
    tuned = GOOD.replace("[agent]\n", "[agent]\n" + keys, 1)
    a = parse(tuned.format(k=K36), env=env).agent
    assert (a.codel_target_ms, a.codel_interval_ms, a.tun_txqueuelen) == (2.0, 40.5, 16)
    assert isinstance(a.codel_target_ms, float)
    off = GOOD.replace("[agent]\n", "[agent]\ncodel_target_ms = 0\n", 1)
    assert parse(off.format(k=K36), env=env).agent.codel_target_ms == 0.0
    for bad, field, hint in (
        ("codel_target_ms = 100\n", "agent.codel_target_ms", "less than agent.codel_interval_ms"),
        ("codel_target_ms = -1\n", "agent.codel_target_ms", "0..1000"),
        ("codel_interval_ms = 0\n", "agent.codel_interval_ms", "1..60000"),
        ("tun_txqueuelen = 0\n", "agent.tun_txqueuelen", "1..100000"),
        ("tun_queue_kb = -1\n", "agent.tun_queue_kb", "0..1048576"),
    ):
        with pytest.raises(ConfigError) as e:
            parse(GOOD.replace("[agent]\n", "[agent]\n" + bad, 1).format(k=K36), env=env)
        assert e.value.field == field and hint in str(e.value), str(e.value)
