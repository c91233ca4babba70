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


@pytest.mark.parametrize("example", sorted(p.name for p in (DEPLOY / "examples").glob("*.toml")))
def test_example_passes_check_from_a_clone(example: str, tmp_path: Path) -> None:
    """``ipsecstack check -c deploy/examples/X.toml`` as the README has it: no environment, from another
    directory (the secret files the examples name are shipped next to them), no warning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPSECSTACK_")}
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "check", "-c", str(DEPLOY / "examples" / example)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.endswith("ok (1 IKE connection(s), 0 manual)\n" if example.startswith("ike-") else
                             "ok (0 IKE connection(s), 1 manual)\n"), r.stdout  # fmt: skip


def test_example_secrets_script(tmp_path: Path) -> None:
    """make-secrets.sh writes fresh secrets of the sizes the examples need; the examples accept them."""
    import shutil

    for p in (DEPLOY / "examples").glob("*.toml"):
        shutil.copy(p, tmp_path)
    r = subprocess.run(["sh", str(DEPLOY / "examples" / "make-secrets.sh"), str(tmp_path)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    shipped = {p.name: p.read_text() for p in (DEPLOY / "examples").iterdir() if p.suffix in (".psk", ".key")}
    assert len(shipped) == 7
    for name, text in shipped.items():
        fresh = (tmp_path / name).read_text()
        assert fresh != text and len(fresh) == len(text), name
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name  # readable by the owner only
    from ipsecstack.config import load

    for p in sorted(tmp_path.glob("*.toml")):
        cfg = load(str(p), {})
        assert (cfg.manual or cfg.connections) and not cfg.warnings, p


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
