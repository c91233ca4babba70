"""One tiny run of the benchmark suite through real namespaces: it measures something and writes its JSON.

Benchmarks are never timed assertions: these only check that each figure was measured (a value, no error).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipsecstack import native
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


ENGINES = ("native", "python") if native.available else ("python",)


def test_tunnel_and_flood_smoke(tmp_path: Path) -> None:
    """Both engines where the native one is built (--engine both), each row labelled with the engine its daemons
    reported on the control socket."""
    doc = _run(tmp_path, "--scenario", "tunnel,flood", "--seconds", "1", "--flood-seconds", "1", "--sizes", "64",
               "--pings", "3", "--rates", "20k", "--engine", "both" if len(ENGINES) == 2 else "python")  # fmt: skip
    rows = doc["rows"]
    assert isinstance(rows, list)
    got = {(r["scenario"], r["engine"], r["test"], r["metric"]): r for r in rows}
    for engine in ENGINES:
        for key in [("tunnel", "tcp-1", "gbps"), ("tunnel", "tcp-4", "gbps"), ("tunnel", "udp-64", "pps"),
                    ("tunnel", "udp-64", "cpu_us_pkt"), ("tunnel", "udp-64@20k", "pps"),
                    ("tunnel", "udp-64@20k", "cpu_us_pkt"), ("tunnel", "ping-idle", "rtt_ms"),
                    ("tunnel", "ping-load", "rtt_ms"), ("flood", "flood-1400", "rss_mb"),
                    ("flood", "flood-1400", "cpu_us_pkt")]:  # fmt: skip
            row = got.get((key[0], engine, *key[1:]))
            assert row is not None, (engine, key, sorted(got))
            assert row["error"] is None and row["value"] > 0, row
            assert row["path"] == "ipsecstack"
            seen = row["extra"]["engine_seen"]
            assert {seen[s]["datapath"] for s in ("a", "b")} == {engine}, seen
    assert {r["engine"] for r in rows} == set(ENGINES)
    machine = doc["machine"]
    assert isinstance(machine, dict) and machine["cores"] and machine["kernel"] and machine["git_commit"]


def test_handshake_smoke(tmp_path: Path) -> None:
    doc = _run(tmp_path, "--scenario", "handshake", "--handshakes", "10", "--idle-sas", "5")
    rows = doc["rows"]
    assert isinstance(rows, list)
    got = {(r["test"], r["metric"]): r for r in rows}
    assert set(got) == {("handshake", "hs_per_s"), ("handshake", "cpu_ms_hs"), ("handshake", "kb_per_sa"),
                        ("idle-sas", "rss_mb"), ("idle-sas", "kb_per_sa")}  # fmt: skip
    hs = got[("handshake", "hs_per_s")]
    assert hs["error"] is None and hs["value"] > 0, hs
    assert hs["extra"]["established"] == 10 and hs["engine"] == ENGINES[0]
    assert hs["extra"]["engine_seen"]["datapath"] == ENGINES[0]
    idle = got[("idle-sas", "rss_mb")]
    assert idle["error"] is None and idle["value"] > 0, idle
    assert idle["extra"]["sas"] == idle["extra"]["daemon_ike_sas"] == 20 + 10 + 5
