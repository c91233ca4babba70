"""The configuration's schema layer: no traceback, no value misread, every error at once (key path, value, fix).

Each case here crashed ``ipsecstack check`` or was silently misread before the schema (issue #9).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipsecstack import config_schema, connections, pki
from ipsecstack.config import AgentConfig, load, parse
from ipsecstack.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]
PSK = "a-pre-shared-key-of-32-characters"  # long enough: no warning

GOOD = f"""
[agent]
log_level = "info"

[connections.gw]
local_addrs = ["192.0.2.1"]
remote_addrs = ["192.0.2.2"]
proposals = ["aes128gcm16-prfsha256-x25519"]
local = {{ auth = "psk", id = "a.example" }}
remote = {{ auth = "psk", id = "b.example" }}

[connections.gw.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]

[secrets.ike.gw]
secret = "{PSK}"
"""

MANUAL = """
[manual.m]
local_addrs = "172.31.0.1"
remote_addrs = "172.31.0.2"
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
spi_in = 0x2001
spi_out = 0x1001
key_in = "{k}"
key_out = "{k}"
""".format(k="ab" * 20)


P = 'proposals = ["aes128gcm16-prfsha256-x25519"]'


def conn(line: str) -> str:
    """GOOD with ``line`` in [connections.gw] instead of its proposals."""
    return GOOD.replace(P, line)


def child(line: str) -> str:
    return GOOD.replace('remote_ts = ["10.2.0.0/16"]', f'remote_ts = ["10.2.0.0/16"]\n{line}')


def agent(line: str) -> str:
    return GOOD.replace('log_level = "info"', line)


def _fields(text: str, **kw: object) -> list[str]:
    """The key paths of every error ``parse`` reports for ``text`` (it must report some)."""
    with pytest.raises(ConfigError) as e:
        parse(text, **kw)  # type: ignore[arg-type]
    return [x.field for x in e.value.errors]


def test_good_files_parse_without_warnings() -> None:
    cfg = parse(GOOD)
    assert [p.name for p in cfg.connections] == ["gw"] and cfg.warnings == [] and cfg.notices == []
    assert parse(MANUAL).manual[0].name == "m"


# every crash site listed in issue #9: each was a traceback (AttributeError, ValueError, TypeError...)
@pytest.mark.parametrize(
    ("text", "path"),
    [
        (GOOD.replace("[connections.gw.children.net]", 'children = ["net"]\n[x]'), "connections.gw.children"),
        (conn('local_port = "fivehundred"'), "connections.gw.local_port"),
        (conn("proposals = [1]"), "connections.gw.proposals[0]"),
        (conn("proposals = [[]]"), "connections.gw.proposals[0]"),
        ('agent = "tun"\n' + GOOD.replace("[agent]\n", "[x]\n"), "agent"),
        ('agent = [""]\n' + GOOD.replace("[agent]\n", "[x]\n"), "agent"),
        ('manual = "x"\n' + GOOD, "manual"),
        (child("esp_proposals = [1]"), "connections.gw.children.net.esp_proposals[0]"),
        (GOOD.replace('id = "b.example"', 'id = "b.example", certs = [7]'), "connections.gw.remote.certs[0]"),
        (GOOD + "\n[secrets.private.k]\nfile = 5\n", "secrets.private.k.file"),
        (GOOD + '\n[pools.p]\naddrs = "10.9.0.0/24"\ndns = "10.1.0.53"\n', "pools.p.dns"),
        (GOOD.replace('secret = "', 'secret_env = ["E"]\nsecret = "'), "secrets.ike.gw.secret_env"),
        (MANUAL.replace("spi_in = 0x2001", "spi_in = 1.5"), "manual.m.spi_in"),
        (MANUAL.replace('local_ts = ["10.1.0.0/16"]', "local_ts = [{}]"), "manual.m.local_ts[0]"),
        (agent('tun_addrs = ["10.1.0.1/16", 3]'), "agent.tun_addrs[1]"),
        (agent("metrics = 9505"), "agent.metrics"),
        (agent('user = "no\\u0000body"'), "agent.user"),
        (conn("dpd_delay = 1e400"), "connections.gw.dpd_delay"),
        (conn('dpd_delay = "99999999999999999999999d"'), "connections.gw.dpd_delay"),
        ("x = " + "[" * 2000 + "]" * 2000, "<file>"),
    ],
)
def test_crash_sites_are_config_errors(text: str, path: str) -> None:
    assert path in _fields(text)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_bytes(GOOD.replace("a.example", "\xe9.example").encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load(str(f), {})
    assert e.value.field == "<file>" and "not UTF-8" in e.value.fix and "offset" in str(e.value.value)


def test_files_named_by_the_config_that_cannot_be_read(tmp_path: Path) -> None:
    """A key file that is not text, or a name with a NUL character, is a config error, not a traceback."""
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe\x00binary")
    f = tmp_path / "c.toml"
    for name, fix in (("bin.key", "not UTF-8"), ("a\\u0000b", "not a valid file name")):
        f.write_text(MANUAL.replace(f'key_in = "{"ab" * 20}"', f'key_in_file = "{name}"'))
        with pytest.raises(ConfigError) as e:
            load(str(f), {})
        assert e.value.field == "manual.m.key_in_file" and fix in e.value.fix, str(e.value)


# every misreading listed in issue #9: each was accepted, and meant something else than written
@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        (conn('encap = "no"'), "connections.gw.encap", "true or false"),
        (GOOD.replace('id = "a.example"', 'id = ["a.example"]'), "connections.gw.local.id", "expected a string"),
        (conn("remote_port = 70000"), "connections.gw.remote_port", "at most 65535"),
        (GOOD.replace('secret = "', 'secert = "'), "secrets.ike.gw.secert",
         "unknown key; known keys here: id, secret, secret_env, secret_file"),
        (agent('log_level = "verbose"'), "agent.log_level", "use debug, info (the default), warning, error"),
        (GOOD.replace('remote_ts = ["10.2.0.0/16"]', 'remote_ts = ["2001:db8::/32"]'),
         "connections.gw.children.net.remote_ts", "local_ts is IPv4 only and remote_ts IPv6 only"),
        (GOOD.replace('local_ts = ["10.1.0.0/16"]', 'local_ts = ["2001:db8:1::/48", "2001:db8:2::/48"]'),
         "connections.gw.children.net.remote_ts", "local_ts is IPv6 only and remote_ts IPv4 only"),
        (MANUAL.replace('remote_ts = ["10.2.0.0/16"]', 'remote_ts = "2001:db8::/32"'), "manual.m.remote_ts",
         "no packet can match both"),
        (conn('mobike = "no"'), "connections.gw.mobike", "true or false"),
        (conn("local_port = true"), "connections.gw.local_port", "expected an integer"),
        (conn('rekey_time = "1 hour"'), "connections.gw.rekey_time", "duration like 30s"),
        (conn("rekey_time = inf"), "connections.gw.rekey_time", "finite"),
        (agent('tun_name = "a-name-far-too-long"'), "agent.tun_name", "15 characters"),
        (agent("retransmit_tries = -1"), "agent.retransmit_tries", "at least 0"),
        (child('rekey_bytes = "5 gigabytes"'), "connections.gw.children.net.rekey_bytes", "a count like 1000"),
        (MANUAL.replace("spi_in = 0x2001", "spi_in = 0x1_0000_0000"), "manual.m.spi_in", "0x100..0xffffffff"),
    ],
)  # fmt: skip
def test_misread_values_are_refused(text: str, path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    (err,) = [x for x in e.value.errors if x.field == path]
    assert hint in str(err), str(err)
    assert PSK not in str(e.value)


def test_a_short_psk_is_a_warning_not_an_error(tmp_path: Path) -> None:
    cfg = parse(GOOD.replace(PSK, "abc"))
    (w,) = cfg.warnings
    assert (w.field, w.value) == ("secrets.ike.gw.secret", "<secret>") and "at least 20" in w.fix
    (w,) = parse(GOOD.replace(f'secret = "{PSK}"', 'secret_env = "P"'), env={"P": "0x0102"}).warnings
    assert w.field == "secrets.ike.gw.secret_env" and "only 2 bytes" in w.fix
    assert parse(GOOD.replace(PSK, "x" * 20)).warnings == []
    f = tmp_path / "c.toml"
    f.write_text(GOOD.replace(PSK, "abc"))
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(f)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"{f}: warning: secrets.ike.gw.secret = '<secret>': only 3 bytes" in r.stderr and "abc" not in r.stderr


THREE = (
    agent('log_level = "verbose"')
    .replace('remote_ts = ["10.2.0.0/16"]', 'remote_ts = ["10.2.0.0/16"]\nesp_proposals = ["aes999"]')
    .replace('secret = "', 'secret_envv = "X"\nsecret = "')
) + MANUAL.replace("spi_out = 0x1001", "spi_out = 5")


def test_every_error_in_the_file_at_once(tmp_path: Path) -> None:
    """Errors in four tables (schema and meaning checks alike) come back together, in file order."""
    with pytest.raises(ConfigErrors) as e:
        parse(THREE)
    assert [x.field for x in e.value.errors] == [
        "agent.log_level",
        "connections.gw.children.net.esp_proposals[0]",
        "secrets.ike.gw.secret_envv",
        "manual.m.spi_out",
    ]
    assert isinstance(e.value, ConfigError) and e.value.field == "agent.log_level"  # as the first, for callers
    assert str(e.value).count("\n") == 3
    f = tmp_path / "c.toml"
    f.write_text(THREE)
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(f)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert [line.split(" = ")[0] for line in lines[:4]] == [f"ipsecstack: {f}: {x.field}" for x in e.value.errors]
    assert lines[4] == f"ipsecstack: {f}: 4 errors"


def test_errors_in_several_connections_and_children() -> None:
    text = GOOD.replace('remote_ts = ["10.2.0.0/16"]', 'remote_ts = ["10.2.0.0/99"]') + (
        '\n[connections.gw.children.two]\nlocal_ts = ["10.1.0.0/16"]\nremote_ts = ["10.3.0.0/16"]\n'
        'esp_proposals = ["aes128-md5"]\n'
        '\n[connections.gw2]\nlocal_addrs = ["192.0.2.1"]\nremote_addrs = ["nowhere"]\n'
        "[connections.gw2.children.c]\n"
    )
    assert _fields(text) == [
        "connections.gw.children.net.remote_ts[0]",
        "connections.gw.children.two.esp_proposals[0]",
        "connections.gw2.remote_addrs",
    ]


@pytest.mark.parametrize(
    "change",
    [
        ('secret = "', 'secret = ["hunter2-hunter2-hunter2"]\nx = "'),
        ('secret = "', 'sekret = "hunter2-hunter2-hunter2"\nsecret = "'),
        ("[secrets.ike.gw]", 'pass = "hunter2-hunter2-hunter2"\n[secrets.ike.gw]'),
        ("[secrets.ike.gw]", '[secrets.ike]\nother = "hunter2-hunter2-hunter2"\n[secrets.ike.gw]'),
        ("[secrets.ike.gw]", '[secrets.private]\nk = "hunter2-hunter2-hunter2"\n[secrets.ike.gw]'),
        ("[connections.gw.children.net]", "[connections.gw.children.net]\nkey_in = 'hunter2-hunter2-hunter2'"),
    ],
)
def test_secrets_never_in_schema_errors(change: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse(GOOD.replace(*change))
    assert "hunter2" not in str(e.value) and "'<secret>'" in str(e.value) and PSK not in str(e.value)


def test_config_errors_stay_config_errors() -> None:
    one = ConfigError("a.b", 1, "fix it")
    assert ConfigErrors.of([one]) is one and one.errors == [one]
    both = ConfigErrors.of([one, ConfigErrors([ConfigError("c", 2, "too"), ConfigError("d", 3, "also")])])
    assert isinstance(both, ConfigErrors) and [x.field for x in both.errors] == ["a.b", "c", "d"]
    assert (both.field, both.value, both.fix) == ("a.b", 1, "fix it")
    with pytest.raises(ValueError, match="at least one"):
        ConfigErrors([])


def test_schema_knows_every_key_the_meaning_checks_read() -> None:
    """A key added to the code but not to the schema would be refused as unknown: keep them in step."""
    fields = config_schema.Document.model_fields
    assert set(config_schema.Connection.model_fields) == connections._CONN_KEYS
    assert set(config_schema.Child.model_fields) == connections._CHILD_KEYS
    assert set(config_schema.Auth.model_fields) == connections._AUTH_KEYS
    assert set(config_schema.KeySecret.model_fields) == pki._KEY_KEYS
    assert set(config_schema.Secrets.model_fields) == {"ike", *pki.KEY_SECTIONS}
    assert set(config_schema.Agent.model_fields) == {f.name for f in dataclasses.fields(AgentConfig)}
    assert set(fields) == {"agent", "manual", "connections", "secrets", "pools"}


def test_published_json_schema_is_current() -> None:
    """deploy/ipsecstack.schema.json is what ``ipsecstack schema`` prints (regenerate it with that command)."""
    committed = json.loads((ROOT / "deploy" / "ipsecstack.schema.json").read_text())
    assert committed == config_schema.json_schema()
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "schema"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == (ROOT / "deploy" / "ipsecstack.schema.json").read_text()
    conn = committed["$defs"]["Connection"]
    assert conn["additionalProperties"] is False and conn["properties"]["remote_port"]["maximum"] == 65535
    assert committed["$defs"]["Agent"]["properties"]["log_level"]["enum"][:2] == ["debug", "info"]
    for example in (ROOT / "deploy" / "examples").glob("*.toml"):  # editors find it from each example
        assert example.read_text().startswith("#:schema ../ipsecstack.schema.json\n"), example
