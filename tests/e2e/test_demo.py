"""The README's main job: ``ipsecstack demo`` negotiates with IKEv2, then carries ESP both ways."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ipsecstack import demo


@pytest.mark.parametrize(
    ("mode", "ike", "esp"),
    [
        ("tunnel", "aes128gcm16-prfsha256-x25519", "aes128gcm16"),
        ("transport", "aes256-sha256-modp2048", "aes256-sha256"),
        ("tunnel", "chacha20poly1305-prfsha256-ecp256", "chacha20poly1305"),
    ],
)
def test_demo_passes(mode: str, ike: str, esp: str) -> None:
    lines: list[str] = []
    assert demo.run(mode, ike, esp, packets=120, out=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "IKE_SA_INIT request" in text and "IKE_AUTH response" in text
    assert "both sides derived the same KEYMAT: yes" in text
    assert "child SA net rekeyed" in text and "CREATE_CHILD_SA request" in text
    assert text.count("delivered intact") == 4  # both directions, before and after the rekey
    assert "IKE SA closed" in text and text.endswith("demo passed")
    assert demo.PSK.hex() not in text


def test_demo_command_line() -> None:
    r = subprocess.run([sys.executable, "-m", "ipsecstack", "demo", "--packets", "30"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "ipsecstack", "demo", "--esp", "des-md5"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown algorithm" in bad.stderr


def test_bench_command() -> None:
    cmd = [sys.executable, "-m", "ipsecstack", "bench", "--packets", "300", "--transform", "aes128-sha256"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "protect" in r.stdout and "unprotect" in r.stdout and "bare cipher" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "ipsecstack", "bench", "--size", "10"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2


def test_readme_main_job_command() -> None:
    """The README's first command, 'bash deploy/setup.sh demo', reusing this test run's virtualenv."""
    import os
    from pathlib import Path

    if sys.prefix == sys.base_prefix:
        pytest.skip("runs only inside the project's virtualenv (deploy/setup.sh test creates it)")
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(["bash", str(repo / "deploy" / "setup.sh"), "demo", "--packets", "20"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "IPSECSTACK_VENV": sys.prefix})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "demo passed" in r.stdout
