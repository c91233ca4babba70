"""Run daemon-level tests (netns, interop) once per datapath engine.

The daemons these tests start pick their engine as a user's would: ``[agent] datapath`` is not in the
configs, so the default applies, and ``IPSECSTACK_DATAPATH`` (documented in the README) sets that
default. ``native`` is what a user gets where the engine was built; ``python`` is the reference.
A module whose daemons carry nothing the engines differ on (AH, which only the Python transforms
implement; backend errors; the benchmark's own smoke test) runs once, on the default, with
``DATAPATH_ENGINES = ("default",)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ipsecstack import native

ENGINES = ("native", "python")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "daemon_engine" in metafunc.fixturenames:
        metafunc.parametrize("daemon_engine", getattr(metafunc.module, "DATAPATH_ENGINES", ENGINES), indirect=True)


@pytest.fixture(autouse=True)
def daemon_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "default":
        yield "default"
        return
    if request.param == "native" and not native.available:
        if os.environ.get("IPSECSTACK_REQUIRE_NATIVE"):
            pytest.fail(f"IPSECSTACK_REQUIRE_NATIVE is set but {native.why_not}")
        pytest.skip(f"native engine: {native.why_not}")
    monkeypatch.setenv("IPSECSTACK_DATAPATH", request.param)
    yield request.param
