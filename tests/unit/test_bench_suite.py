"""The benchmark suite's driver and output, on canned results (no benchmark runs, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run
from bench.suite import compare, paths, report
from bench.suite.common import ProcWatch, Row, parse_ping, udp_result
from ipsecstack.config import parse

REPO = Path(__file__).resolve().parents[2]


def test_scenarios_are_parsed_from_lists_and_repeats() -> None:
    assert run.parse_args(["--scenario", "tunnel,compare"]).scenarios == ["tunnel", "compare"]
    assert run.parse_args(["--scenario", "flood", "--scenario", "micro,flood"]).scenarios == ["flood", "micro"]
    assert run.parse_args([]).scenarios == list(run.SCENARIOS)
    assert run.parse_args(["--scenario", "all"]).scenarios == list(run.SCENARIOS)
    assert run.parse_args(["--scenario", "compare", "--paths", "ipsecstack,veth"]).path_list == ("veth", "ipsecstack")


@pytest.mark.parametrize("argv", [
    ["--scenario", "tunel"], ["--scenario", ","], ["--sizes", "64,abc"], ["--sizes", "2000"], ["--window", "40"],
    ["--engine", "native"], ["--paths", "wireguard"], ["--seconds", "0"], ["--handshakes", "0"],
])  # fmt: skip
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_quick_and_explicit_settings() -> None:
    s = run.settings_from(run.parse_args(["--quick"]))
    assert (s.seconds, s.flood_seconds, s.pings, s.handshakes, s.micro_packets) == (2.0, 4.0, 10, 200, 3000)
    s = run.settings_from(run.parse_args(["--quick", "--seconds", "7", "--sizes", "64,1400", "--handshakes", "10000",
                                          "--encap"]))  # fmt: skip
    assert (s.seconds, s.sizes, s.handshakes, s.encap, s.engine) == (7.0, (64, 1400), 10000, True, "python")
    full = run.settings_from(run.parse_args([]))
    assert (full.seconds, full.sizes, full.handshakes) == (5.0, (64, 512, 1400), 1000)


def test_step_count_covers_every_measurement() -> None:
    s = run.settings_from(run.parse_args(["--quick"]))
    # tunnel: tcp-1, tcp-4, 3 UDP sizes, 2 pings; flood: 1; compare: both for 3 paths + 2 handshake responders
    assert run.total_steps(["tunnel"], s, paths.PATHS) == 7
    assert run.total_steps(["compare"], s, paths.PATHS) == 3 * 8 + 2
    assert run.total_steps(["compare"], s, ("veth",)) == 8


def test_the_bench_configuration_is_a_valid_product_configuration() -> None:
    text = paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/tmp/x.sock")
    assert "inner_backend" not in text and "outer_backend" not in text  # the user's defaults, no backend keys
    cfg = parse(text)
    (conn,) = cfg.connections
    assert conn.local_addr == "172.31.1.1" and cfg.start == ["bench"] and cfg.agent.tun_addrs == ["10.1.0.1/16"]
    assert parse(paths.ipsecstack_config("172.31.1.2", "172.31.1.1", "b", "/tmp/y.sock")).start == []
    assert conn.encap is False
    assert parse(paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/s", encap=True)).connections[0].encap
    with pytest.raises(ValueError, match="native"):
        paths.agent_lines("native")


def _canned() -> list[Row]:
    rows = []
    for path, gbps, rtt, cpu in (("veth", 10.0, 0.1, None), ("strongswan", 0.25, 1.0, 40.0),
                                 ("ipsecstack", 0.5, 0.5, 20.0)):  # fmt: skip
        engine = "python" if path == "ipsecstack" else None
        rows.append(Row("compare", path, engine, "tcp-1", "gbps", gbps))
        rows.append(Row("compare", path, engine, "ping-idle", "rtt_ms", rtt, None, {"min": rtt}))
        if cpu is not None:
            rows.append(Row("compare", path, engine, "udp-64", "cpu_us_pkt", cpu))
    rows.append(Row("compare", "strongswan", None, "handshake", "hs_per_s", None, "charon exited\nlog..."))
    rows.append(Row("compare", "ipsecstack", "python", "handshake", "hs_per_s", 300.0))
    return rows


def test_ratios_are_ours_over_theirs_per_test_and_metric() -> None:
    by = {(e["test"], e["metric"]): e for e in compare.ratios(_canned())}
    assert [k[0] for k in by] == ["tcp-1", "ping-idle", "udp-64", "handshake"]  # the order the tests ran in
    tcp = by[("tcp-1", "gbps")]
    assert tcp["vs_strongswan"] == pytest.approx(2.0) and tcp["vs_veth"] == pytest.approx(0.05)
    assert tcp["better"] == "higher" and tcp["unit"] == "Gbit/s"
    rtt = by[("ping-idle", "rtt_ms")]
    assert rtt["vs_strongswan"] == pytest.approx(0.5) and rtt["better"] == "lower"
    cpu = by[("udp-64", "cpu_us_pkt")]
    assert cpu["vs_strongswan"] == pytest.approx(0.5) and cpu["vs_veth"] is None  # veth has no daemon
    assert by[("handshake", "hs_per_s")]["vs_strongswan"] is None  # strongSwan's figure failed


def test_tables_show_values_ratios_and_errors() -> None:
    text = report.ratio_table(compare.ratios(_canned()))
    line = next(ln for ln in text.splitlines() if ln.startswith("tcp-1"))
    assert line.split()[-5:] == ["10.00", "0.250", "0.500", "2.00", "0.050"]
    md = report.markdown_ratio_table(compare.ratios(_canned()))
    assert "| tcp-1 | gbps (Gbit/s) | higher | 10.00 | 0.250 | 0.500 | 2.00 | 0.050 |" in md
    rows = report.rows_table(_canned())
    assert "ERROR" in rows and "charon exited" in rows and "log..." not in rows  # the error's first line only
    assert report.fmt(None) == "-" and report.fmt(163222.4) == "163,222" and report.fmt(0.0123) == "0.012"


def test_json_round_trip(tmp_path: Path) -> None:
    rows = _canned()
    doc = report.document({"cpu": "test cpu", "git_commit": "abc"}, {"seconds": 2.0}, ["compare"], rows,
                          {"compare": compare.ratios(rows)}, "2026-01-01T00:00:00Z", 1.23)  # fmt: skip
    out = report.write_json(tmp_path / "sub" / "r.json", doc)
    back = json.loads(out.read_text())
    assert back["machine"]["cpu"] == "test cpu" and back["scenarios"] == ["compare"] and back["elapsed_s"] == 1.2
    assert back["rows"][0] == {
        "scenario": "compare",
        "path": "veth",
        "engine": None,
        "test": "tcp-1",
        "metric": "gbps",
        "value": 10.0,
        "error": None,
        "extra": {},
        "unit": "Gbit/s",
    }
    assert report.load_rows(back) == rows
    assert back["ratios"]["compare"][0]["vs_strongswan"] == pytest.approx(2.0)


def test_plots_or_a_message_when_matplotlib_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        written, why = report.plot(_canned(), tmp_path / "suite-x")
        assert why is None and [p.name for p in written] == ["suite-x-compare.png"]
        assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written, why = report.plot(_canned(), tmp_path / "suite-y")
    assert written == [] and why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "suite-y-compare.png").exists()


def test_iperf_and_ping_output_parsing() -> None:
    res = {"end": {"sum": {"packets": 1000, "lost_packets": 250, "seconds": 2.0}, "sum_sent": {"packets": 1000}}}
    assert udp_result(res, 5.0) == (750, 1000, 2.0)
    assert udp_result({"error": "x"}, 5.0) == (0, 0, 5.0)
    ok = parse_ping("20 packets transmitted, 19 received, 5% packet loss, time 1900ms\n"
                    "rtt min/avg/max/mdev = 0.040/0.953/1.066/0.013 ms\n")  # fmt: skip
    assert ok == {"min": 0.04, "avg": 0.953, "max": 1.066, "mdev": 0.013, "sent": 20, "received": 19}
    lost = parse_ping("3 packets transmitted, 0 received, 100% packet loss, time 2002ms\n")
    assert "avg" not in lost and lost["error"] == "0 of 3 pings answered"
    assert "error" in parse_ping("", "ping: connect: Network is unreachable")


def test_procwatch_reads_cpu_and_memory_of_a_process() -> None:
    import os

    with ProcWatch({"me": os.getpid()}) as w:
        sum(i * i for i in range(300_000))  # some CPU to account
    assert w.cpu["me"] >= 0 and w.rss_peak_kb["me"] > 0 and w.hwm_kb["me"] >= w.rss_peak_kb["me"] > 1000


def test_cli_bench_scenario_delegates_to_the_suite() -> None:
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "bench", "--scenario", "nonsense"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "unknown scenario 'nonsense'" in r.stderr and "bench/run.py" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "bench", "--no-such-flag"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr
