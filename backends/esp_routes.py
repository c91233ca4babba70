"""A routing table of its own for the protected packets of NFQUEUE transport mode (path MTU, RFC 4301 §8).

Theory of operation
-------------------
In transport mode the host's packet and its ESP/AH form go to the same address, so the kernel routes
both with the same route, and a path MTU learnt for one is the other's too. The kernel's own IPsec
keeps them apart (an xfrm bundle has the inner MTU, the path below it the outer one); through NFQUEUE
they would not be: after the datapath tells a sender with ICMP "fragmentation needed" that its packets
may be at most ``link MTU - overhead`` long (so that, protected, they fit), the kernel would apply that
smaller MTU to the protected packets as well and drop or fragment every full-sized one.

So the protected packets are routed by a table of their own: the outbound queue's verdicts set a
firewall mark (``MARK``) on every replacement, the kernel re-routes a packet whose mark a verdict
changed, and ``ip rule fwmark MARK lookup TABLE`` sends it to ``TABLE``, a copy of the main table made
at start. Its routes carry a metric of their own, so the kernel keeps them apart from the main table's
(identical routes share their next hop, and with it the learnt MTUs). Installed at start, removed at
stop; a rule or table left by a run that did not stop cleanly is removed first. The copy is taken once:
routes added to the main table later are not followed (restart, or SIGHUP does not help: say so).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from ipsecstack.runtime.io import BackendError

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]

MARK = 0x1B5EC  # "ipsec"
TABLE = 2_471
RULE_PREF = 9_471
METRIC = 4_471
MAX_STALE = 16


class EspRoutes:
    def __init__(self, families: Iterable[int], runner: Runner, log: Any) -> None:
        self.families = sorted(set(families))
        self._run = runner
        self.log = log
        self._installed: list[int] = []

    def _ip(self, fam: int, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(["ip", f"-{fam}", *args])

    def _remove(self, fam: int) -> int:
        n = 0
        for _ in range(MAX_STALE):
            r = self._ip(fam, "rule", "del", "pref", str(RULE_PREF))
            if r.returncode != 0:
                break
            n += 1
        self._ip(fam, "route", "flush", "table", str(TABLE))
        return n

    def install(self) -> None:
        for fam in self.families:
            if self._remove(fam):
                self.log.warning("removing a stale routing rule left by an earlier run", family=fam, pref=RULE_PREF)
            routes = self._ip(fam, "-o", "route", "show", "table", "main")
            if routes.returncode != 0:
                raise BackendError(f"ip -{fam} route show failed: {routes.stderr.strip()}")
            self._installed.append(fam)
            for line in routes.stdout.splitlines():
                words = line.replace("\\", " ").split()
                if not words or words[0] in ("unreachable", "prohibit", "blackhole", "multicast"):
                    continue
                if "metric" in words:  # ours replaces it: the kernel must not share the next hop
                    i = words.index("metric")
                    del words[i : i + 2]
                if "linkdown" in words:
                    words.remove("linkdown")
                r = self._ip(fam, "route", "add", *words, "metric", str(METRIC), "table", str(TABLE))
                if r.returncode != 0 and "File exists" not in r.stderr:
                    self.log.warning("route not copied for protected packets", route=line, error=r.stderr.strip())
            r = self._ip(fam, "rule", "add", "pref", str(RULE_PREF), "fwmark", hex(MARK), "lookup", str(TABLE))
            if r.returncode != 0:
                raise BackendError(f"ip -{fam} rule add fwmark {hex(MARK)} lookup {TABLE} failed: {r.stderr.strip()}")

    def remove(self) -> None:
        while self._installed:
            fam = self._installed.pop()
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._remove(fam)
