"""The one place the package touches the OS random source.

The sans-IO core never calls it directly: an ``rng`` callable (``n -> n random bytes``) is passed into
every object that needs randomness, and this module supplies the default used by the public
convenience constructors. Tests pass a seeded generator instead, which makes output reproducible.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

Rng = Callable[[int], bytes]

system_rng: Rng = os.urandom


def seeded_rng(seed: int) -> Rng:
    """A deterministic generator for tests and reproducible demos. Not for production keys."""
    gen = random.Random(seed)
    return gen.randbytes
