"""deploy/: the systemd unit's hardening, and the two-namespace demo script on a real kernel."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_systemd_unit_is_hardened() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "ipsecstack.service")
    svc = unit["Service"]
    assert "ipsecstack run -c /etc/ipsecstack/ipsecstack.toml" in svc["ExecStart"]
    assert "ipsecstack check -c" in svc["ExecStartPre"]
    assert svc["NoNewPrivileges"] == "yes"
    assert set(svc["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert svc["ProtectSystem"] == "strict" and svc["RuntimeDirectory"] == "ipsecstack"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_netns_demo_script_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(DEPLOY / "netns-demo.sh")]).returncode == 0


@pytest.mark.root
def test_netns_demo_script_runs() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, TUN (CI runs as root)")
    r = subprocess.run(["bash", str(DEPLOY / "netns-demo.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "3 received" in r.stdout and "established" in r.stdout
    names = r.stdout.split("namespaces: ", 1)[1].split("\n", 1)[0].split()
    assert len(names) == 2 and names[0].startswith("ipsdemo-a-"), r.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(names) & set(listed)  # this run removed its own namespaces
