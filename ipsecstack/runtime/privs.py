"""Dropping root after start-up (``[agent] user = "name"``).

Theory of operation
-------------------
The daemon starts as root because opening what it needs takes privileges: the TUN device, raw and
UDP sockets (IKE's port 500), the NFQUEUE binding and its iptables rules, the control socket and the
metrics listener. Once all of that is open (the file descriptors stay valid whoever owns the
process), :func:`drop` changes to the configured user and keeps only three capabilities:

- ``CAP_NET_ADMIN``: routes and addresses over rtnetlink (pyroute2), NFQUEUE verdicts and unbinding,
  the ``iptables`` rules removed at shutdown;
- ``CAP_NET_RAW``: raw sockets (already open; kept for helpers that open their own);
- ``CAP_NET_BIND_SERVICE``: ports below 1024.

The sequence (every step checked, in this order; Linux semantics from capabilities(7) and prctl(2)):

1. ``prctl(PR_SET_KEEPCAPS, 1)``: the permitted set survives the change from uid 0 to the user
   (without it the kernel clears every capability);
2. ``setgroups(<the user's groups>)``, ``setgid(<primary gid>)``, ``setuid(<uid>)``: real, effective
   and saved ids all change, so root cannot be taken back (checked: ``setuid(0)`` must fail);
3. ``capset``: effective = permitted = inheritable = exactly the three capabilities (everything
   else leaves the permitted set for good);
4. ``prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)`` for each: ambient capabilities are kept
   across ``execve`` by non-root programs, so the ``iptables``/``ip`` children the backends run
   (at shutdown, for clean-up) still have them;
5. ``prctl(PR_SET_KEEPCAPS, 0)``.

The id changes go through glibc, which applies them to every thread of the process; ``capset`` and
``prctl`` act on the calling thread only. Call :func:`drop` from the thread that runs the event loop
(the one that later spawns the clean-up commands); threads started afterwards inherit its
credentials, threads that already exist (e.g. the metrics server) end up as the user with no
capabilities at all.

What is opened after the drop is opened as the user: the configuration and key/secret files that a
SIGHUP reload re-reads must be readable by it. So must the Python installation, for modules imported
on first use; :func:`preload` imports this project's modules and the lazily loaded ones we know of
(cryptography's OpenSSL backend) beforehand, so an interpreter the user cannot read (one under
``/root``, mode 0700) still works. The control socket's directory stays root's, so the socket file is
left behind at shutdown (the next start replaces it). For the same reason the MODP key-pair worker
process (:mod:`ipsecstack.runtime.kexworker`) is started before the drop, as root; it becomes the user
itself, with no capabilities at all (:func:`confine`), before it reads anything from the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pkgutil
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from ipsecstack.runtime.io import BackendError

CAP_SETGID = 6
CAP_SETUID = 7
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
KEPT_CAPS: dict[str, int] = {
    "CAP_NET_BIND_SERVICE": CAP_NET_BIND_SERVICE,
    "CAP_NET_ADMIN": CAP_NET_ADMIN,
    "CAP_NET_RAW": CAP_NET_RAW,
}
KEPT_MASK = sum(1 << bit for bit in KEPT_CAPS.values())  # 0x3400
_NEEDED_TO_DROP = {"CAP_SETUID": CAP_SETUID, "CAP_SETGID": CAP_SETGID, **KEPT_CAPS}

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: third-party modules imported on first use, possibly long after start-up (the first DH of an IKE SA)
PRELOAD_EXTRA = ("cryptography.hazmat.backends.openssl.backend", "encodings.idna")


class PrivilegeError(BackendError):
    """Privileges cannot be dropped as configured; the message says why and what to do."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    FIELDS = ("effective", "permitted", "inheritable")
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _oserror(what: str) -> PrivilegeError:
    err = ctypes.get_errno()
    return PrivilegeError(f"dropping privileges: {what} failed: {os.strerror(err)}")


def _prctl(option: int, arg2: int, arg3: int = 0) -> int:
    ulong = ctypes.c_ulong
    rc: int = _libc.prctl(ctypes.c_int(option), ulong(arg2), ulong(arg3), ulong(0), ulong(0))
    if rc < 0:
        raise _oserror(f"prctl({option}, {arg2}, {arg3})")
    return rc


def lookup(name: str) -> Account:
    """The user's ids and groups; KeyError if there is no such user."""
    pw = pwd.getpwnam(name)
    return Account(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))


def capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) capability masks of the calling thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise _oserror("capget")
    eff, prm, inh = (sum(int(getattr(data[i], f)) << (32 * i) for i in range(2)) for f in _CapData.FIELDS)
    return eff, prm, inh


def cap_names(mask: int) -> list[str]:
    names = {bit: name for name, bit in KEPT_CAPS.items()}
    return [names.get(bit, f"cap_{bit}") for bit in range(64) if mask >> bit & 1]


def preload(packages: Iterable[str] = ("ipsecstack", "backends")) -> None:
    """Import every module of ``packages`` and :data:`PRELOAD_EXTRA` while the installation is readable.

    Modules that cannot be imported (an optional dependency is missing) are skipped: code that needs
    them reports it as it would have anyway.
    """
    for name in PRELOAD_EXTRA:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    for pkg in packages:
        try:
            path = importlib.import_module(pkg).__path__
        except (ImportError, AttributeError):
            continue
        for info in pkgutil.walk_packages(path, f"{pkg}.", onerror=lambda name: None):
            if not info.name.endswith(".__main__"):
                with contextlib.suppress(Exception):
                    importlib.import_module(info.name)


def preflight(name: str) -> Account:
    """Check, before anything is opened, that :func:`drop` to ``name`` can succeed."""
    try:
        account = lookup(name)
    except KeyError:
        raise PrivilegeError(f"agent.user = {name!r}: no such user on this system (create it or use another)") from None
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"agent.user = {name!r}: dropping privileges needs the daemon started as root "
            f"(it runs as uid {os.geteuid()}): start it as root, or remove agent.user"
        )
    effective = capabilities()[0]
    missing = [cap for cap, bit in _NEEDED_TO_DROP.items() if not effective >> bit & 1]
    if missing:
        raise PrivilegeError(
            f"agent.user = {name!r}: dropping privileges needs {', '.join(missing)}, which this process lacks "
            "(systemd: add them to CapabilityBoundingSet)"
        )
    return account


def drop(account: Account) -> None:
    """Become ``account`` keeping only :data:`KEPT_CAPS` (see the module docstring); raises PrivilegeError."""
    _prctl(PR_SET_KEEPCAPS, 1)
    try:
        os.setgroups(list(account.groups))
        os.setgid(account.gid)
        os.setuid(account.uid)
    except OSError as e:
        raise PrivilegeError(f"dropping privileges to {account.name!r}: {e.strerror}") from None
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = KEPT_MASK
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _oserror("capset")
    for bit in KEPT_CAPS.values():
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, bit)
    _prctl(PR_SET_KEEPCAPS, 0)
    _verify(account)


def confine(account: Account | None) -> None:
    """For a helper process that needs no privilege at all (the key-pair worker, runtime/kexworker.py).

    Become ``account`` unless it already is (a helper started before the daemon's :func:`drop`, as
    root), then give up every capability (ambient, effective, permitted, inheritable) and, with
    ``PR_SET_NO_NEW_PRIVS``, any way to gain one back through ``execve`` (prctl(2)). ``account=None``
    keeps the ids (a daemon that stays root, or one started as its user) and still drops the
    capabilities. Raises PrivilegeError.
    """
    if account is not None and os.getresuid() != (account.uid,) * 3:
        try:
            os.setgroups(list(account.groups))
            os.setgid(account.gid)
            os.setuid(account.uid)  # without PR_SET_KEEPCAPS: the kernel clears the permitted set
        except OSError as e:
            raise PrivilegeError(f"confining a helper as {account.name!r}: {e.strerror}") from None
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _oserror("capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if capabilities() != (0, 0, 0):
        raise PrivilegeError("confining a helper: capabilities left after capset")
    if account is not None and (os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3):
        raise PrivilegeError(f"confining a helper as {account.name!r}: the ids did not change")


def exit_with_parent(sig: int) -> None:
    """``sig`` to this process when the thread that started it ends (``PR_SET_PDEATHSIG``, prctl(2)).

    A change of the effective ids clears this setting: call it after :func:`confine`.
    """
    _prctl(PR_SET_PDEATHSIG, sig)


def _verify(account: Account) -> None:
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise PrivilegeError(f"dropping privileges to {account.name!r}: the ids did not change")
    if capabilities() != (KEPT_MASK,) * 3:
        raise PrivilegeError(f"dropping privileges to {account.name!r}: unexpected capability sets")
    if not all(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, bit) == 1 for bit in KEPT_CAPS.values()):
        raise PrivilegeError(f"dropping privileges to {account.name!r}: ambient capabilities not set")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(f"dropping privileges to {account.name!r}: root could be regained")
