"""The benchmark suite's driver and output, on canned results (no benchmark runs, no timing asserted)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.suite import compare, goals, paths, report, tunnel
from bench.suite.common import ProcWatch, Row, default_engine, engine_choice, parse_ping, udp_result
from ipsecstack import native
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
    ["--engine", "rust"], ["--paths", "wireguard"], ["--seconds", "0"], ["--handshakes", "0"], ["--rates", "abc"],
    ["--rates", "0"], ["--rates", "50k,-1"], ["--rates", "nan"], ["--rate-sizes", "2000"], ["--rate-sizes", "x"],
    ["--idle-sas", "-1"],
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
    assert (s.seconds, s.sizes, s.handshakes, s.encap, s.engine) == (7.0, (64, 1400), 10000, True, default_engine())
    full = run.settings_from(run.parse_args([]))
    assert (full.seconds, full.sizes, full.handshakes) == (5.0, (64, 512, 1400), 1000)
    assert (full.rates, full.rate_sizes, full.idle_sas) == ((50_000, 100_000, 200_000), (64,), 0)
    s = run.settings_from(run.parse_args(["--rates", "20000,1.5m,20k", "--rate-sizes", "64,512", "--idle-sas", "500"]))
    assert (s.rates, s.rate_sizes, s.idle_sas) == ((20_000, 1_500_000), (64, 512), 500)  # 20000 = 20k: once
    assert run.settings_from(run.parse_args(["--rates", "none"])).rates == ()


def test_engine_option() -> None:
    s = run.settings_from(run.parse_args(["--engine", "python"]))
    assert (s.engine, s.engines) == ("python", ("python",))
    default = run.settings_from(run.parse_args([]))
    assert default.engines == (default_engine(),) == (("native",) if native.available else ("python",))
    if native.available:
        s = run.settings_from(run.parse_args(["--engine", "both"]))
        assert (s.engine, s.engines) == ("native", ("native", "python"))
        assert run.settings_from(run.parse_args(["--engine", "native"])).engines == ("native",)


def test_native_engine_refused_where_it_is_not_built(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(native, "available", False)
    monkeypatch.setattr(native, "why_not", "the C extension is not available (test)")
    assert default_engine() == "python" and engine_choice("python") == ("python",)
    for name in ("native", "both"):
        with pytest.raises(ValueError, match=r"not built here .*test.*--engine python"):
            engine_choice(name)
    with pytest.raises(SystemExit):
        run.parse_args(["--engine", "both"])
    assert "--engine: the native engine is not built" in capsys.readouterr().err
    assert run.settings_from(run.parse_args([])).engines == ("python",)


def test_rates_and_their_test_names() -> None:
    assert [run.parse_rate(x) for x in ("50k", "1.5M", "200000", " 2k ")] == [50_000, 1_500_000, 200_000, 2000]
    for bad in ("", "k", "-5k", "0", "1e", "inf"):
        with pytest.raises(ValueError):
            run.parse_rate(bad)
    assert [tunnel.rate_label(r) for r in (50_000, 1_500_000, 750, 12_345)] == ["50k", "1.5m", "750", "12.345k"]
    s = run.settings_from(run.parse_args(["--rates", "50k,100k", "--rate-sizes", "64,1400", "--sizes", "64"]))
    assert tunnel.rate_tests(s) == ["udp-64@50k", "udp-64@100k", "udp-1400@50k", "udp-1400@100k"]
    assert tunnel.tests(s) == ["tcp-1", "tcp-4", "udp-64", *tunnel.rate_tests(s), "ping-idle", "ping-load"]
    assert tunnel.rate_of("udp-1400@100k", s) == (1400, 100_000)


def test_step_count_covers_every_measurement() -> None:
    s = run.settings_from(run.parse_args(["--quick", "--engine", "python"]))
    # tunnel: tcp-1, tcp-4, 3 UDP sizes, 3 fixed rates, 2 pings; flood: 1; compare: both for 3 paths + 2 responders
    assert run.total_steps(["tunnel"], s, paths.PATHS) == 10
    assert run.total_steps(["compare"], s, paths.PATHS) == 3 * 11 + 2
    assert run.total_steps(["compare"], s, ("veth",)) == 11
    s = run.settings_from(run.parse_args(["--quick", "--engine", "python", "--rates", "none", "--idle-sas", "9"]))
    assert run.total_steps(["tunnel", "handshake"], s, paths.PATHS) == 7 + 2  # handshake + idle-sas
    both = replace(s, engines=("native", "python"))  # what --engine both gives where the engine is built
    assert run.total_steps(["tunnel", "flood", "micro"], both, paths.PATHS) == 2 * (7 + 1) + 6
    assert run.total_steps(["compare"], both, paths.PATHS) == 4 * 8 + 3 * 2  # ipsecstack twice, 3 responders


def test_the_bench_configuration_is_a_valid_product_configuration() -> None:
    text = paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/tmp/x.sock")
    assert "inner_backend" not in text and "outer_backend" not in text  # the user's defaults, no backend keys
    cfg = parse(text)
    (conn,) = cfg.connections
    assert conn.local_addr == "172.31.1.1" and cfg.start == ["bench"] and cfg.agent.tun_addrs == ["10.1.0.1/16"]
    assert parse(paths.ipsecstack_config("172.31.1.2", "172.31.1.1", "b", "/tmp/y.sock")).start == []
    assert conn.encap is False
    assert parse(paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/s", encap=True)).connections[0].encap
    assert cfg.agent.datapath == "python" and paths.agent_lines("native") == 'datapath = "native"\n'
    assert cfg.agent.offloads is True and "offloads" not in text  # on by default: the user writes nothing
    off = parse(paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/s", offloads=False))
    assert off.agent.offloads is False  # bench/run.py --no-offloads
    if native.available:
        cfg = parse(paths.ipsecstack_config("172.31.1.1", "172.31.1.2", "a", "/s", engine="native"))
        assert cfg.agent.datapath == "native"
    with pytest.raises(ValueError, match="unknown datapath engine 'rust'"):
        paths.agent_lines("rust")


def _canned() -> list[Row]:
    """A compare run: veth, strongSwan, ipsecstack on the native and the Python engine."""
    rows = []
    for path, engine, gbps, rtt, cpu in (("veth", None, 10.0, 0.1, None), ("strongswan", None, 0.25, 1.0, 40.0),
                                         ("ipsecstack", "native", 1.5, 0.8, 10.0),
                                         ("ipsecstack", "python", 0.5, 0.5, 20.0)):  # fmt: skip
        rows.append(Row("compare", path, engine, "tcp-1", "gbps", gbps))
        rows.append(Row("compare", path, engine, "ping-idle", "rtt_ms", rtt, None, {"min": rtt}))
        if cpu is not None:
            rows.append(Row("compare", path, engine, "udp-64", "cpu_us_pkt", cpu))
    rows.append(Row("compare", "strongswan", None, "handshake", "hs_per_s", None, "charon exited\nlog..."))
    rows.append(Row("compare", "ipsecstack", "native", "handshake", "hs_per_s", 310.0))
    rows.append(Row("compare", "ipsecstack", "python", "handshake", "hs_per_s", 300.0))
    return rows


def test_ratios_are_ours_over_theirs_per_test_metric_and_engine() -> None:
    entries = compare.ratios(_canned())
    by = {(e["test"], e["metric"], e["engine"]): e for e in entries}
    assert list(by) == [(t, m, e) for t, m in (("tcp-1", "gbps"), ("ping-idle", "rtt_ms"), ("udp-64", "cpu_us_pkt"),
                                               ("handshake", "hs_per_s")) for e in ("native", "python")]  # fmt: skip
    tcp = by[("tcp-1", "gbps", "python")]
    assert tcp["vs_strongswan"] == pytest.approx(2.0) and tcp["vs_veth"] == pytest.approx(0.05)
    assert tcp["better"] == "higher" and tcp["unit"] == "Gbit/s" and tcp["ipsecstack"] == 0.5
    native_tcp = by[("tcp-1", "gbps", "native")]
    assert native_tcp["vs_strongswan"] == pytest.approx(6.0) and native_tcp["strongswan"] == 0.25
    rtt = by[("ping-idle", "rtt_ms", "python")]
    assert rtt["vs_strongswan"] == pytest.approx(0.5) and rtt["better"] == "lower"
    cpu = by[("udp-64", "cpu_us_pkt", "native")]
    assert cpu["vs_strongswan"] == pytest.approx(0.25) and cpu["vs_veth"] is None  # veth has no daemon
    assert by[("handshake", "hs_per_s", "native")]["vs_strongswan"] is None  # strongSwan's figure failed
    # a test only the other paths have: one entry without an engine; an ipsecstack error: no value, no ratio
    rows = [*_canned(), Row("compare", "veth", None, "udp-9000", "pps", 5.0),
            Row("compare", "ipsecstack", "native", "udp-64", "pps", None, "engine mismatch"),
            Row("compare", "strongswan", None, "udp-64", "pps", 100.0)]  # fmt: skip
    more = {(e["test"], e["metric"], e["engine"]): e for e in compare.ratios(rows)}
    assert more[("udp-9000", "pps", None)]["veth"] == 5.0 and more[("udp-9000", "pps", None)]["ipsecstack"] is None
    assert more[("udp-64", "pps", "native")]["vs_strongswan"] is None


def test_tables_show_values_ratios_engines_and_errors() -> None:
    text = report.ratio_table(compare.ratios(_canned()))
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("tcp-1")]
    assert [ln[4:] for ln in lines] == [["native", "10.00", "0.250", "1.50", "6.00", "0.150"],
                                        ["python", "10.00", "0.250", "0.500", "2.00", "0.050"]]  # fmt: skip
    md = report.markdown_ratio_table(compare.ratios(_canned()))
    assert "| tcp-1 | gbps (Gbit/s) | higher | python | 10.00 | 0.250 | 0.500 | 2.00 | 0.050 |" in md
    rows = report.rows_table(_canned())
    assert "ERROR" in rows and "charon exited" in rows and "log..." not in rows  # the error's first line only
    assert report.fmt(None) == "-" and report.fmt(163222.4) == "163,222" and report.fmt(0.0123) == "0.012"


def _goal(results: list[dict[str, Any]], engine: str, name: str, test: str, stretch: bool = False,
          against: str | None = "strongswan") -> dict[str, Any]:  # fmt: skip
    (g,) = [g for g in results if (g["engine"], g["goal"], g["test"], g["stretch"], g["against"])
            == (engine, name, test, stretch, against)]  # fmt: skip
    return g


def test_goals_of_issue_10_on_canned_ratios() -> None:
    rows = [*_canned(),
            Row("compare", "strongswan", None, "udp-64", "pps", 20_000.0), Row("compare", "veth", None, "udp-64", "pps",
            150_000.0), Row("compare", "ipsecstack", "native", "udp-64", "pps", 110_000.0),
            Row("compare", "ipsecstack", "native", "flood-1400", "rss_mb", 62.0),
            Row("compare", "strongswan", None, "udp-64@50k", "cpu_us_pkt", 30.0),
            Row("compare", "ipsecstack", "native", "udp-64@50k", "cpu_us_pkt", 45.0)]  # fmt: skip
    res = goals.evaluate(compare.ratios(rows), ("native", "python"))
    tcp1 = _goal(res, "native", "TCP, 1 stream", "tcp-1")
    assert tcp1["measured"] == pytest.approx(6.0) and tcp1["met"] is True and tcp1["target"] == ">= 5x strongSwan"
    stretch = _goal(res, "native", "TCP, 1 stream", "tcp-1", stretch=True)
    assert stretch["met"] is False and stretch["target"] == ">= 10x strongSwan (stretch)"
    tcp4 = _goal(res, "native", "TCP, 4 streams", "tcp-4")
    assert tcp4["met"] is None and tcp4["why"] == "not in this run"
    assert _goal(res, "native", "UDP 64 B packets/s", "udp-64")["measured"] == pytest.approx(5.5)
    veth = _goal(res, "native", "UDP 64 B packets/s", "udp-64", against="veth")
    assert veth["measured"] == pytest.approx(110 / 150) and veth["met"] is True and veth["target"] == ">= 0.7x veth"
    rss = _goal(res, "native", "flood RSS per daemon", "flood-1400", against=None)
    assert rss["measured"] == 62.0 and rss["met"] is True and rss["target"] == "< 100 MB"
    assert _goal(res, "native", "CPU per packet", "udp-64")["met"] is True  # 10 us vs 40 us
    at_rate = _goal(res, "native", "CPU per packet", "udp-64@50k")
    assert at_rate["measured"] == pytest.approx(1.5) and at_rate["met"] is False  # every test its own line
    assert _goal(res, "native", "ping RTT idle", "ping-idle")["met"] is True  # 0.8 ms vs 1.0 ms
    assert _goal(res, "python", "TCP, 1 stream", "tcp-1")["measured"] == pytest.approx(2.0)
    assert _goal(res, "python", "TCP, 1 stream", "tcp-1")["met"] is True  # >= 2x: exactly 2 is met
    only_python = goals.evaluate(compare.ratios([r for r in rows if r.engine != "native"]), ("python",))
    skipped = _goal(only_python, "native", "TCP, 1 stream", "tcp-1")
    assert skipped["met"] is None and "native engine did not run" in skipped["why"]
    # a figure that failed: measured None, not met, and why
    failed = [r if (r.path, r.test) != ("strongswan", "tcp-1") else Row("compare", "strongswan", None, "tcp-1",
              "gbps", None, "charon exited") for r in rows]  # fmt: skip
    g = _goal(goals.evaluate(compare.ratios(failed), ("native", "python")), "native", "TCP, 1 stream", "tcp-1")
    assert g["measured"] is None and g["met"] is None and g["why"] == "no strongswan figure (see the errors)"
    text = report.goals_table(res)
    line = next(ln for ln in text.splitlines() if "udp-64@50k" in ln)
    assert " ".join(line.split()) == "native CPU per packet udp-64@50k cpu_us_pkt 1.50 < 1x strongSwan NOT MET"
    tcp4_line = next(ln for ln in text.splitlines() if "tcp-4" in ln and ln.startswith("native"))
    assert " ".join(tcp4_line.split()).endswith("not measured not in this run")
    md = report.markdown_goals_table(res)
    assert "| native | TCP, 1 stream | tcp-1 gbps | 6.00 | >= 5x strongSwan | met |" in md


def test_json_round_trip(tmp_path: Path) -> None:
    rows = _canned()
    entries = compare.ratios(rows)
    doc = report.document({"cpu": "test cpu", "git_commit": "abc"}, {"seconds": 2.0}, ["compare"], rows,
                          {"compare": entries}, "2026-01-01T00:00:00Z", 1.23,
                          {"compare": goals.evaluate(entries, ("native", "python"))})  # fmt: skip
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
    first = back["ratios"]["compare"][0]
    assert first["engine"] == "native" and first["vs_strongswan"] == pytest.approx(6.0)
    assert _goal(back["goals"]["compare"], "python", "TCP, 1 stream", "tcp-1")["met"] is True


def _path(**seen: dict[str, Any]) -> paths.Path:
    return paths.Path("ipsecstack", None, "10.1.0.1", "10.2.0.1", "native", engine_seen=dict(seen))  # type: ignore[arg-type]


def test_engine_mismatch_is_an_error_in_the_row_not_a_label() -> None:
    ok: dict[str, Any] = {"datapath": "native", "python_sas": {}, "child_engines": ["native"]}
    assert paths.engine_mismatch("native", ok) is None
    assert paths.engine_mismatch("python", {**ok, "datapath": "python", "child_engines": ["python"]}) is None
    assert "runs 'python'" in (paths.engine_mismatch("native", {**ok, "datapath": "python"}) or "")
    assert "left SAs to Python" in (paths.engine_mismatch("native", {**ok, "python_sas": {"0x1 in": "AH"}}) or "")
    assert "not on the native engine" in (paths.engine_mismatch("native", {**ok, "child_engines": ["python"]}) or "")
    assert "not verified" in (paths.engine_mismatch("native", {"error": "no socket"}) or "")
    good = paths.stamp([Row("tunnel", "ipsecstack", "native", "tcp-1", "gbps", 1.0)], _path(a=ok, b=ok))
    assert good[0].value == 1.0 and good[0].error is None and good[0].extra["engine_seen"]["b"] == ok
    bad = _path(a=ok, b={**ok, "datapath": "python"})
    bad.engine_error = "side b: asked for datapath 'native', the daemon runs 'python'"
    (r,) = paths.stamp([Row("tunnel", "ipsecstack", "native", "tcp-1", "gbps", 1.0)], bad)
    assert r.value is None and r.error == bad.engine_error and r.extra["unverified_value"] == 1.0
    veth = paths.Path("veth", None, "a", "b", None)  # type: ignore[arg-type]
    assert paths.stamp([Row("tunnel", "veth", None, "tcp-1", "gbps", 9.0)], veth)[0].extra == {}


def test_engine_report_reads_the_control_socket(tmp_path: Path) -> None:
    """A stand-in daemon answering the control protocol (one JSON line in, one out) with canned answers."""
    sock_path = str(tmp_path / "c.sock")
    answers = {
        "status": {"ok": True, "result": {"datapath": "native", "python_sas": {}, "ike": {"sas": 3}}},
        "list-sas": {"ok": True, "result": [{"name": "bench", "children": [{"engine": "native"}]},
                                            {"name": "manual", "sas": []}]},
    }  # fmt: skip
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)
    srv.settimeout(10)

    def serve() -> None:
        for _ in range(2):
            conn, _addr = srv.accept()
            with conn:
                cmd = json.loads(conn.makefile().readline())["cmd"]
                conn.sendall(json.dumps(answers[cmd]).encode() + b"\n")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        seen = paths.engine_report(sock_path, timeout=5)
    finally:
        th.join(timeout=10)
        srv.close()
    assert seen == {"datapath": "native", "python_sas": {}, "child_engines": ["native"], "ike_sas": 3}
    assert paths.engine_mismatch("native", seen) is None
    gone = paths.engine_report(str(tmp_path / "nothing.sock"), timeout=1)
    assert "control socket" in gone["error"] and paths.engine_mismatch("native", gone)


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
    # VmHWM and the sampled VmRSS are read at different moments while this process still allocates: a few
    # pages apart either way
    assert w.cpu["me"] >= 0 and w.rss_peak_kb["me"] > 1000 and w.hwm_kb["me"] + 1024 >= w.rss_peak_kb["me"]


def test_cli_bench_scenario_delegates_to_the_suite() -> None:
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "bench", "--scenario", "nonsense"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "unknown scenario 'nonsense'" in r.stderr and "bench/run.py" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "bench", "--no-such-flag"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr
