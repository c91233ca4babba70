"""The forwarder's fuzz harness (tests/native/fuzz_datagram.py) inside the test suite, bounded.

A seeded loop of random inputs (the same every run) goes into a running pair of forwarders; they must
not crash and must still forward afterwards. For long runs use the harness itself (see its docstring).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from tests.native import fuzz_datagram
from tests.native.native_helpers import needs_native

pytestmark = needs_native


@pytest.fixture
def rig() -> Iterator[fuzz_datagram.Rig]:
    r = fuzz_datagram.rig()
    yield r
    r.close()
    fuzz_datagram._rig = None


def test_random_datagrams_never_crash_the_forwarder(rig: fuzz_datagram.Rig) -> None:
    rnd = random.Random(20240612)
    for i in range(1500):
        fuzz_datagram.one_input(rnd.randbytes(rnd.randrange(2, 400)))
        if i % 500 == 499:
            time.sleep(0.05)
            rig.drain()
            rig.check_alive()
    time.sleep(0.1)
    rig.drain()
    rig.check_alive()
    st = rig.b.engine.fwd_stats()
    assert st["batches_in"] > 0 and st["drops"], st
