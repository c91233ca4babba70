"""The native engine is optional: without it the package imports, says why, and the Python datapath runs.

These tests run whether or not the extension was built. Where the build is expected (the CI machine
installs the compiler and libssl-dev: ``deploy/setup.sh test`` sets ``IPSECSTACK_REQUIRE_NATIVE=1``), a
missing extension is a failure rather than a skip of every native test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ipsecstack import native

BLOCKED = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ipsecstack.native._engine":
                raise ImportError("blocked by the test", name=name)
            return None

    sys.meta_path.insert(0, NoNative())
    from ipsecstack import SecurityAssociation, native, protect, unprotect
    assert native.available is False
    print("why:", native.why_not)
    try:
        native.Engine
    except ImportError as e:
        print("engine:", e)
    key = bytes(20)
    out = SecurityAssociation(1, "esp", "transport", "aes128gcm16", key)
    inb = SecurityAssociation(1, "esp", "transport", "aes128gcm16", key)
    from ipsecstack.wire.ip import build_ipv4
    pkt = build_ipv4(0, 28, 1, True, 64, 17, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])) + bytes(8)
    assert unprotect(inb, protect(out, pkt)) == pkt
    print("python datapath ok")
    """
)


def test_without_the_extension_the_package_says_why_and_works() -> None:
    r = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert "blocked by the test" in lines["why"] and "libssl-dev" in lines["why"]
    assert lines["engine"].startswith("ipsecstack.native.Engine: the C extension")
    assert "python datapath ok" in r.stdout


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        native.Engin  # type: ignore[attr-defined]  # noqa: B018


def test_built_where_it_is_required() -> None:
    if not os.environ.get("IPSECSTACK_REQUIRE_NATIVE"):
        pytest.skip("IPSECSTACK_REQUIRE_NATIVE is not set (deploy/setup.sh test sets it)")
    assert native.available, native.why_not
    assert native.why_not == ""
