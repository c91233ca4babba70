"""Build of the optional native ESP engine (ipsecstack.native._engine); everything else is in pyproject.toml.

The extension is C against CPython's API, linked to OpenSSL's libcrypto (Debian: gcc, python3-dev,
libssl-dev). It is optional: where it cannot be built (no compiler, no headers) the install still
succeeds, ``ipsecstack.native.available`` is False and ``ipsecstack.native.why_not`` says why, and the
Python datapath runs. ``IPSECSTACK_NO_NATIVE=1`` skips it on purpose. Extra compiler flags come from
the usual ``CFLAGS``/``LDFLAGS`` (tests/native/run_sanitized.sh builds with sanitizers that way).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import Extension, setup

NATIVE = "ipsecstack/native"


def libcrypto_flags() -> tuple[list[str], list[str], list[str]]:
    """(include dirs, library dirs, libraries) for libcrypto, from pkg-config when it is there."""
    if shutil.which("pkg-config"):
        try:
            cflags = subprocess.run(["pkg-config", "--cflags", "libcrypto"], capture_output=True, text=True, check=True)
            libs = subprocess.run(["pkg-config", "--libs", "libcrypto"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            pass
        else:
            inc = [f[2:] for f in cflags.stdout.split() if f.startswith("-I")]
            libdirs = [f[2:] for f in libs.stdout.split() if f.startswith("-L")]
            names = [f[2:] for f in libs.stdout.split() if f.startswith("-l")]
            return inc, libdirs, names or ["crypto"]
    return [], [], ["crypto"]


def extensions() -> list[Extension]:
    if os.environ.get("IPSECSTACK_NO_NATIVE"):
        return []
    inc, libdirs, libs = libcrypto_flags()
    return [
        Extension(
            "ipsecstack.native._engine",
            sources=[f"{NATIVE}/{name}.c" for name in (
                    "_engine", "batch", "params", "esp", "cipher", "replay", "sa", "table",
                    "fwd", "fwd_out", "fwd_in", "fwd_seg", "fwd_coal", "codel", "flowcache", "punt", "pyfwd", "nfq", "fwd_nfq", "fwd_nfq_gso", "pynfq",
                )],
            depends=[f"{NATIVE}/{h}.h" for h in ("engine", "pyglue", "engine_obj", "fwd", "nfq")],
            include_dirs=inc,
            library_dirs=libdirs,
            libraries=[*libs, "m"],  # m: sqrt in codel.c
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fvisibility=hidden"],
            optional=True,
        )
    ]


setup(ext_modules=extensions())
