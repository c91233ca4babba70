"""The differential fuzz harness (tests/native/fuzz_unprotect.py) inside the test suite, bounded.

hypothesis drives ``one_input`` (and shrinks what it finds to a small input); a seeded loop of random
inputs follows, the same every run. For long runs use the harness itself (atheris, or ``--random``):
see its docstring. Here a disagreement between the engines or a crash of the native one fails the test;
a crash of the Python reference is reported as the failure it is.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.native.fuzz_unprotect import one_input
from tests.native.native_helpers import needs_native

pytestmark = needs_native


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=600))
def test_engines_agree_on_anything(data: bytes) -> None:
    one_input(data)


def test_engines_agree_on_seeded_random_inputs() -> None:
    rnd = random.Random(20240611)
    for _ in range(1500):
        one_input(rnd.randbytes(rnd.randrange(1, 500)))
