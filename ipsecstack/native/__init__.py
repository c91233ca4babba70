"""The native ESP engine: a C extension linked to OpenSSL's libcrypto, optional at import (DESIGN.md §4a).

``available`` says whether the extension was built; when it was not, ``why_not`` says why and how to
build it, and the Python datapath (the reference implementation) is what runs. The engine itself is
:class:`ipsecstack.native.engine.Engine`, re-exported here when available::

    from ipsecstack import native
    if native.available:
        eng = native.Engine()
        eng.install_sa(outbound_sa)                # a validated SecurityAssociation
        wire = eng.protect(outbound_sa.spi, [pkt])  # [bytes] or [reason str]

The engine holds the SAs the Datapath hands it (``native/link.py``), runs batch protect/unprotect with
the GIL released, and, on the TUN planes, forwards packets in threads of its own (``fwd.h``; the daemon's
side is ``ipsecstack/runtime/fastpath.py``).
"""

from __future__ import annotations

import importlib
from typing import NoReturn

_BUILD_HINT = (
    "it is compiled when ipsecstack is installed, if gcc, the Python headers and OpenSSL's headers are there "
    "(Debian: apt-get install gcc python3-dev libssl-dev pkg-config, then pip install -e . again)"
)

try:
    importlib.import_module("ipsecstack.native._engine")
except ImportError as exc:
    why_not = f"the C extension ipsecstack.native._engine is not available ({exc}); {_BUILD_HINT}"
else:
    why_not = ""

#: True when the C extension was built and loads; otherwise ``why_not`` says why.
available = not why_not

if available:
    from ipsecstack.native.engine import Engine, NativeEvent

    __all__ = ["Engine", "NativeEvent", "available", "why_not"]
else:
    __all__ = ["available", "why_not"]


def __getattr__(name: str) -> NoReturn:
    if name in ("Engine", "NativeEvent"):
        raise ImportError(f"ipsecstack.native.{name}: {why_not}")
    raise AttributeError(f"module 'ipsecstack.native' has no attribute {name!r}")
