"""One tiny run of the benchmark suite through real namespaces: it measures something and writes its JSON.

Benchmarks are never timed assertions: these only check that each figure was measured (a value, no error).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil

# the benchmark chooses its engine itself (bench --engine)
DATAPATH_ENGINES = ("default",)

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str) -> dict[str, object]:
    nsutil.need_root()
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args, "--no-plots", "--no-progress",
                        "--json", str(out)], capture_output=True, text=True, timeout=80)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    doc: dict[str, object] = json.loads(out.read_text())
    assert str(out) in r.stdout
    return doc


def test_tunnel_and_flood_smoke(tmp_path: Path) -> None:
    doc = _run(tmp_path, "--scenario", "tunnel,flood", "--seconds", "1", "--flood-seconds", "1", "--sizes", "64",
               "--pings", "3")  # fmt: skip
    rows = doc["rows"]
    assert isinstance(rows, list)
    got = {(r["scenario"], r["test"], r["metric"]): r for r in rows}
    for key in [("tunnel", "tcp-1", "gbps"), ("tunnel", "tcp-4", "gbps"), ("tunnel", "udp-64", "pps"),
                ("tunnel", "udp-64", "cpu_us_pkt"), ("tunnel", "ping-idle", "rtt_ms"),
                ("tunnel", "ping-load", "rtt_ms"), ("flood", "flood-1400", "rss_mb"),
                ("flood", "flood-1400", "cpu_us_pkt")]:  # fmt: skip
        assert key in got, sorted(got)
        assert got[key]["error"] is None and got[key]["value"] > 0, got[key]
        assert got[key]["path"] == "ipsecstack" and got[key]["engine"] == "python"
    machine = doc["machine"]
    assert isinstance(machine, dict) and machine["cores"] and machine["kernel"] and machine["git_commit"]


def test_handshake_smoke(tmp_path: Path) -> None:
    doc = _run(tmp_path, "--scenario", "handshake", "--handshakes", "10")
    rows = doc["rows"]
    assert isinstance(rows, list)
    got = {r["metric"]: r for r in rows}
    assert set(got) == {"hs_per_s", "cpu_ms_hs", "kb_per_sa"}
    assert got["hs_per_s"]["error"] is None and got["hs_per_s"]["value"] > 0, got["hs_per_s"]
    assert got["hs_per_s"]["extra"]["established"] == 10
