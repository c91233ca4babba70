"""``children.<child>.updown``: run the child's script when it comes up and goes down, like strongSwan.

Theory of operation
-------------------
The IKE endpoint calls :meth:`Updown.up` when a child SA is installed (not when it is rekeyed: the
rekeyed SA keeps the reqid, and strongSwan does not call the script either) and :meth:`Updown.down`
when the last SA of that reqid is removed. Each call becomes one job per pair of local and remote
traffic selectors of the same address family (strongSwan's updown plugin does the same), with the
environment strongSwan's ``_updown`` scripts read (``PLUTO_VERB``, ``PLUTO_MY_CLIENT``, ...; see
:func:`environment`).

Jobs run one at a time, in order, in a single asyncio task, so a ``down`` never overtakes its ``up``
and the event loop never blocks on a script. Each run is bounded by ``timeout`` seconds (then it is
killed); its combined stdout/stderr is logged; a failure (exit code, signal, timeout, not startable)
is logged as a warning and changes nothing else. At shutdown (:meth:`close`) the jobs still queued and
the ``down`` of every child still up run synchronously, each with the same bound, so scripts can undo
what they did (firewall rules, routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from ipsecstack.ike.session import ChildUp, IkeSa, id_text
from ipsecstack.ike.ts import Range

UPDOWN_TIMEOUT = 20.0  # seconds a script may run before it is killed
MAX_OUTPUT = 16384  # bytes of a script's output that reach the log
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _subnet(r: Range) -> str:
    """The smallest prefix holding the whole range (strongSwan's ``to_subnet``), as CIDR."""
    bits = r.start.max_prefixlen
    plen = bits - (int(r.start) ^ int(r.end)).bit_length()
    return str(ipaddress.ip_network(f"{r.start}/{plen}", strict=False))


def _port(r: Range) -> str:
    return str(r.port_lo) if r.port_lo == r.port_hi else "0"


def environment(ev: ChildUp[IkeSa], reqid: int, up: bool, local: Range, remote: Range, *, unique_id: int,
                interface: str | None) -> dict[str, str]:  # fmt: skip
    """strongSwan's updown variables (``PLUTO_VERSION=1.1``) for one pair of traffic selectors."""
    sa = ev.sa
    me = sa.cfg.local_addr
    host = local.start == local.end and str(local.start) == me  # the local TS is this host's IKE address
    verb = ("up" if up else "down") + ("-host" if host else "-client") + ("-v6" if local.start.version == 6 else "")
    env = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "PLUTO_VERSION": "1.1",
        "PLUTO_VERB": verb,
        "PLUTO_CONNECTION": ev.child.name,
        "PLUTO_INTERFACE": interface or "unknown",
        "PLUTO_REQID": str(reqid),
        "PLUTO_PROTO": ev.protocol,  # esp or ah, as strongSwan's
        "PLUTO_UNIQUEID": str(unique_id),
        "PLUTO_ME": me,
        "PLUTO_MY_ID": id_text(*sa.local_identity),
        "PLUTO_MY_CLIENT": _subnet(local),
        "PLUTO_MY_PORT": _port(local),
        "PLUTO_MY_PROTOCOL": str(local.proto),
        "PLUTO_PEER": sa.remote,
        "PLUTO_PEER_ID": id_text(*sa.peer_id) if sa.peer_id else "",
        "PLUTO_PEER_CLIENT": _subnet(remote),
        "PLUTO_PEER_PORT": _port(remote),
        "PLUTO_PEER_PROTOCOL": str(remote.proto),
    }
    if sa.virtual_ip:
        env["PLUTO_MY_SOURCEIP"] = sa.virtual_ip
    if sa.peer_virtual_ip:
        env["PLUTO_PEER_SOURCEIP"] = sa.peer_virtual_ip
    if ev.encap:
        env["PLUTO_UDP_ENC"] = str(sa.remote_port)
    return env


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Job:
    argv: tuple[str, ...]
    env: dict[str, str]
    conn: str


class Updown:
    def __init__(self, log: Any, *, interface: str | None = None, timeout: float = UPDOWN_TIMEOUT) -> None:
        self.log = log
        self.interface = interface
        self.timeout = timeout
        self.runs = 0
        self.failures = 0
        self._active: dict[int, tuple[ChildUp[IkeSa], int]] = {}  # reqid -> (latest ChildUp, unique id) of children up
        self._jobs: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- what the IKE endpoint calls -------------------------------------------------------------

    def up(self, ev: ChildUp[IkeSa], reqid: int, unique_id: int) -> None:
        """A child SA was installed (not a rekey)."""
        if not ev.child.updown:
            return
        self._active[reqid] = (ev, unique_id)
        self._queue(ev, reqid, True, unique_id)

    def rekeyed(self, ev: ChildUp[IkeSa], reqid: int) -> None:
        """A rekey replaced the SAs of ``reqid``: no script run, but ``down`` will describe the new SAs."""
        if reqid in self._active:
            self._active[reqid] = (ev, self._active[reqid][1])

    def down(self, reqid: int) -> None:
        """The last SA of ``reqid`` was removed."""
        item = self._active.pop(reqid, None)
        if item is not None:
            self._queue(item[0], reqid, False, item[1])

    def close(self) -> None:
        """Shutdown: run what is queued and the ``down`` of every child still up, synchronously (bounded)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for reqid in list(self._active):
            self.down(reqid)
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            self._run_sync(job)

    # --- jobs --------------------------------------------------------------------------------------

    def _queue(self, ev: ChildUp[IkeSa], reqid: int, up: bool, unique_id: int) -> None:
        for local in ev.local_ts:
            for remote in ev.remote_ts:
                if local.start.version != remote.start.version:
                    continue
                env = environment(ev, reqid, up, local, remote, unique_id=unique_id, interface=self.interface)
                self._jobs.append(Job(ev.child.updown, env, f"{ev.sa.cfg.name}/{ev.child.name}"))
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (yet): close() or the next call picks the job up
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._worker())
        assert self._wake is not None
        self._wake.set()

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            while self._jobs:
                await self._run(self._jobs.pop(0))
            self._wake.clear()
            await self._wake.wait()

    async def _run(self, job: Job) -> None:
        verb = job.env["PLUTO_VERB"]
        try:
            # a session of its own, so a timeout kills what the script started too (they hold the pipe)
            proc = await asyncio.create_subprocess_exec(*job.argv, env=job.env, stdin=subprocess.DEVNULL,
                                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        start_new_session=True)  # fmt: skip
        except OSError as e:
            self._report(job, verb, None, f"cannot start it: {e.strerror or e}")
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            self._report(job, verb, None, f"killed after {self.timeout:g}s")
            return
        self._report(job, verb, proc.returncode, None, out)

    def _run_sync(self, job: Job) -> None:
        verb = job.env["PLUTO_VERB"]
        try:
            proc = subprocess.Popen(job.argv, env=job.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        except OSError as e:
            self._report(job, verb, None, f"cannot start it: {e.strerror or e}")
            return
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
            if proc.stdout is not None:
                proc.stdout.close()
            self._report(job, verb, None, f"killed after {self.timeout:g}s")
            return
        self._report(job, verb, proc.returncode, None, out)

    def _report(self, job: Job, verb: str, code: int | None, problem: str | None, out: bytes = b"") -> None:
        self.runs += 1
        text = out[:MAX_OUTPUT].decode(errors="replace").rstrip()
        if code == 0:
            self.log.info("updown", conn=job.conn, verb=verb, script=job.argv[0], exit_code=0, output=text)
            return
        self.failures += 1
        why = problem or (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        self.log.warning("updown script failed", conn=job.conn, verb=verb, script=job.argv[0], exit_code=code,
                         error=why, output=text)  # fmt: skip
