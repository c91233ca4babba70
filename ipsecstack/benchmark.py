"""``ipsecstack bench``: how fast this machine protects and unprotects, against the bare cipher call.

A quick, self-contained measurement (the full matrix and the backend benchmarks live in ``bench/``):
for one transform and packet size, packets/s of ``protect`` and ``unprotect`` through the real SA code
and of the bare ``cryptography`` call on the same number of bytes, best of a few repetitions.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

from ipsecstack import SecurityAssociation, protect, unprotect
from ipsecstack.crypto.registry import parse_esp_transform
from ipsecstack.wire import ip


def _best(fn: Callable[[int], None], n: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure(transform: str = "aes128gcm16", size: int = 1400, packets: int = 20000) -> dict[str, float]:
    """Packets/s of ``protect``, ``unprotect`` and the bare cipher call (``ceiling``), best of 3 runs each."""
    suite = parse_esp_transform(transform)
    key = os.urandom(suite.key_len)
    inner = ip.build_ipv4(0, size, 1, True, 64, 17, bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])) + os.urandom(size - 20)
    kw = {"tunnel_src": "192.0.2.1", "tunnel_dst": "192.0.2.2"}
    tx = SecurityAssociation(0x1000, "esp", "tunnel", transform, key, **kw)  # type: ignore[arg-type]
    wires = [protect(tx, inner) for _ in range(packets)]

    def do_protect(n: int) -> None:
        sa = SecurityAssociation(0x1000, "esp", "tunnel", transform, key, **kw)  # type: ignore[arg-type]
        for _ in range(n):
            protect(sa, inner)

    def do_unprotect(n: int) -> None:
        sa = SecurityAssociation(0x1000, "esp", "tunnel", transform, key, **kw)  # type: ignore[arg-type]
        for w in wires[:n]:
            unprotect(sa, w)

    ceiling = _ceiling(suite, key, size)
    return {"ceiling": _best(ceiling, packets), "protect": _best(do_protect, packets),
            "unprotect": _best(do_unprotect, packets)}  # fmt: skip


def run(
    transform: str = "aes128gcm16", size: int = 1400, packets: int = 20000, out: Callable[[str], None] = print
) -> int:
    parse_esp_transform(transform)  # an unknown transform fails before the banner
    out(f"ipsecstack bench: ESP {transform}, tunnel mode, {size}-byte packets, {packets} per run (best of 3)")
    out(f"  machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    res = measure(transform, size, packets)
    c = res["ceiling"]
    for name in ("protect", "unprotect"):
        pps = res[name]
        overhead = (1 / pps - 1 / c) * 1e6
        out(f"  {name:<9} {pps:>10,.0f} packets/s  {pps * size * 8 / 1e9:6.3f} Gbit/s  "
            f"(bare cipher {c:,.0f}/s, ratio {pps / c:.2f}, +{overhead:.2f} us/packet)")  # fmt: skip
    return 0


def _ceiling(suite: object, key: bytes, size: int) -> Callable[[int], None]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    from ipsecstack.crypto.registry import EspSuite

    assert isinstance(suite, EspSuite)
    data = os.urandom(size + 2)
    nonce, aad = os.urandom(12), os.urandom(8)
    encr = suite.encr
    if encr.aead:
        aead = (AESGCM if encr.kind == "gcm" else ChaCha20Poly1305)(key[: encr.key_len])

        def call(n: int) -> None:
            for _ in range(n):
                aead.encrypt(nonce, data, aad)

        return call
    import hmac

    assert suite.integ is not None
    h = hmac.new(key[encr.key_len :], digestmod=suite.integ.hash_name)

    def mac(n: int) -> None:
        for _ in range(n):
            c = h.copy()
            c.update(data)
            c.digest()

    return mac
