"""The key-pair worker: a child process of the daemon that computes g^x mod p for the pool.

Theory of operation
-------------------
:class:`ipsecstack.runtime.kepool.KeyPairPool` starts this module's :func:`main` in a fresh
interpreter (``python -I -c``, see :func:`command`), with its stdin and stdout as pipes to the daemon
and stderr on /dev/null: it never logs. It is the daemon's own child on a private pipe, in the same
trust domain as the daemon, and only ever sees a group number and a private exponent drawn by the
daemon (never anything from the network). It answers with g^x mod p, which the daemon sends in the
clear anyway.

It prepares itself before it reads a request: it loads OpenSSL's DH code (one exponentiation of a
tiny exponent) while whatever it was started as can still read the Python installation; then
:func:`ipsecstack.runtime.privs.confine` makes it the daemon's ``[agent] user`` (if the daemon was
started as root and will drop to that user, the worker was started before the drop) with no
capabilities at all; then ``PR_SET_PDEATHSIG`` kills it with the daemon (set after the id change,
which clears it), and a parent already gone ends it at once.

Frames (binary, fixed size per group, no pickle), answered one at a time in request order:

- request: the group number (1 byte), then x big-endian in the group's size;
- answer: ``OK`` (1 byte) then g^x mod p in the group's size, or ``REFUSED`` (1 byte) when x is
  outside [2, p-2] or OpenSSL fails.

An unknown group number or a short frame cannot be resynchronised: the worker exits, as it does at
EOF on stdin (the pool was closed, or the daemon died) and when its answers cannot be written.
"""

from __future__ import annotations

import os
import signal
import sys

from ipsecstack.ike.groups import GROUPS
from ipsecstack.runtime.privs import Account, confine, exit_with_parent

OK, REFUSED = 0, 1
_BOOT = "import sys; sys.path[:] = sys.argv[3:]; from ipsecstack.runtime.kexworker import main; main(*sys.argv[1:3])"


def command(user: Account | None) -> list[str]:
    """The worker's command line: this interpreter, isolated (``-I``), with the daemon's ``sys.path``."""
    spec = "-" if user is None else ":".join((user.name, str(user.uid), str(user.gid), *map(str, user.groups)))
    return [sys.executable, "-I", "-c", _BOOT, spec, str(os.getpid()), *(p for p in sys.path if isinstance(p, str))]


def _account(spec: str) -> Account | None:
    if spec == "-":
        return None
    name, uid, gid, *groups = spec.split(":")
    return Account(name, int(uid), int(gid), tuple(int(g) for g in groups))


def _read(fd: int, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None at EOF."""
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def answer(number: int, exponent: bytes) -> bytes:
    """The answer frame for one request (also used by the tests)."""
    group = GROUPS[number]
    x = int.from_bytes(exponent, "big")
    if not 2 <= x <= group.prime - 2:
        return bytes([REFUSED])
    try:
        return bytes([OK]) + group.modp_public(x)
    except ValueError:
        return bytes([REFUSED])


def serve(fd_in: int, fd_out: int) -> None:
    """Answer requests until EOF (or a frame that cannot be one)."""
    while True:
        head = _read(fd_in, 1)
        group = GROUPS.get(head[0]) if head is not None else None
        if group is None or group.kind != "modp":
            return
        exponent = _read(fd_in, group.size)
        if exponent is None:
            return
        _write(fd_out, answer(group.number, exponent))


def main(spec: str, parent: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when it stops; this exits with it
    GROUPS[14].modp_public(2)  # OpenSSL's DH code loaded while the installation is readable
    confine(_account(spec))
    exit_with_parent(signal.SIGKILL)
    if os.getppid() != int(parent):
        return  # the daemon is already gone
    try:
        serve(sys.stdin.fileno(), sys.stdout.fileno())
    except OSError:  # the daemon closed our stdout: nothing left to do
        return
