"""``[agent] datapath``: the native engine where it was built, the Python one on request or where it was not."""

from __future__ import annotations

import pytest

from backends.memory import MemoryLink
from ipsecstack import native
from ipsecstack.config import build_datapath, parse
from ipsecstack.errors import ConfigError
from ipsecstack.runtime.node import Node

MANUAL = """
{agent}
[manual.site]
local_addrs = "192.0.2.1"
remote_addrs = "192.0.2.2"
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
spi_in = 0x1001
spi_out = 0x1002
key_in = "{k}"
key_out = "{k}"
{ah}
""".replace("{k}", "00" * 20)

AH = """
[manual.host]
protocol = "ah"
transform = "sha256"
local_addrs = "192.0.2.1"
remote_addrs = "192.0.2.3"
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.3.0.0/16"]
spi_in = 0x2001
spi_out = 0x2002
key_in = "{k}"
key_out = "{k}"
""".replace("{k}", "00" * 32)

needs_native = pytest.mark.skipif(not native.available, reason=f"native engine: {native.why_not}")


def _dp(agent: str = "", env: dict[str, str] | None = None, ah: str = "") -> tuple[str | None, str]:
    cfg = parse(MANUAL.format(agent=agent, ah=ah))
    dp = build_datapath(cfg, 0.0, env or {})
    return cfg.agent.datapath, dp.engine_name


@needs_native
def test_the_default_is_the_native_engine_where_it_was_built() -> None:
    assert _dp() == ("native", "native")
    assert _dp('[agent]\ndatapath = "python"') == ("python", "python")
    assert _dp('[agent]\ndatapath = "native"') == ("native", "native")


@needs_native
def test_the_environment_sets_only_the_default() -> None:
    assert _dp(env={"IPSECSTACK_DATAPATH": "python"}) == ("python", "python")
    assert _dp('[agent]\ndatapath = "native"', {"IPSECSTACK_DATAPATH": "python"}) == ("native", "native")
    assert _dp(env={"IPSECSTACK_DATAPATH": "bogus"}) == ("native", "native")


def test_without_the_extension_python_runs_and_asking_for_native_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "available", False)
    monkeypatch.setattr(native, "why_not", "the C extension ipsecstack.native._engine is not available (test)")
    assert _dp() == ("python", "python")
    assert _dp(env={"IPSECSTACK_DATAPATH": "native"}) == ("python", "python")
    with pytest.raises(ConfigError) as e:
        parse(MANUAL.format(agent='[agent]\ndatapath = "native"', ah=""))
    text = str(e.value)
    assert "agent.datapath" in text and "not available" in text and 'datapath = "python"' in text


def test_a_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        parse(MANUAL.format(agent='[agent]\ndatapath = "kernel"', ah=""))
    assert "agent.datapath" in str(e.value)


@needs_native
def test_status_says_which_engine_runs_and_which_sas_stay_on_python() -> None:
    cfg = parse(MANUAL.format(agent="", ah=AH))
    dp = build_datapath(cfg, 0.0, {})
    link = MemoryLink()
    node = Node(dp, link.a, link.b)
    c = node.counters()
    assert c["datapath"] == "native"
    # ESP runs in the engine; AH is not implemented there and stays on the Python transforms, said so
    assert sorted(k.split()[0] for k in c["python_sas"]) == ["0x00002001", "0x00002002"]
    assert all("AH" in why for why in c["python_sas"].values())
    engines = {s["spi"]: s["engine"] for s in node.sa_counters()}
    assert engines == {"0x00001001": "native", "0x00001002": "native", "0x00002001": "python", "0x00002002": "python"}
    py = build_datapath(parse(MANUAL.format(agent='[agent]\ndatapath = "python"', ah="")), 0.0, {})
    link = MemoryLink()
    assert Node(py, link.a, link.b).counters()["datapath"] == "python"
