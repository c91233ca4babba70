"""Every datapath test runs against both engines: the Python reference and the native engine (issue #10).

A ``Datapath()`` built by a test without an ``engine`` gets a fresh native engine in the ``native`` run,
so the same assertions hold for both; SAs the engine does not implement (AH, inbound selectors, TFC
padding) stay on the Python transforms in both runs, as they do in the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from ipsecstack import native
from ipsecstack.datapath import Datapath


@pytest.fixture(autouse=True, params=["python", "native"])
def datapath_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "native":
        if not native.available:
            if os.environ.get("IPSECSTACK_REQUIRE_NATIVE"):
                pytest.fail(f"IPSECSTACK_REQUIRE_NATIVE is set but {native.why_not}")
            pytest.skip(f"native engine: {native.why_not}")
        original = Datapath.__init__

        def init(self: Datapath, *args: Any, engine: Any = None, **kwargs: Any) -> None:
            original(self, *args, engine=engine if engine is not None else native.Engine(), **kwargs)

        monkeypatch.setattr(Datapath, "__init__", init)
    yield request.param
