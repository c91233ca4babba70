"""SIGHUP: re-read the configuration and apply the difference to the running node.

Theory of operation
-------------------
The running :class:`~ipsecstack.config.Config` is kept; a reload loads the file again (a broken one is
reported and changes nothing), compares connection by connection and touches only what changed:
manual SAs and policies are reinstalled, IKE connections removed or changed are terminated with their
trap policies, new or changed ones get trap policies (reqids counting on from the highest in use) and
are initiated when ``start_action = start``. ``[agent]`` is fixed for the process's life.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ipsecstack.agent.build import TRAP_REQID_BASE
from ipsecstack.agent.services import force_encap
from ipsecstack.config import Config, load, manual_policies, manual_sas
from ipsecstack.errors import ConfigError
from ipsecstack.ike.install import trap_policies
from ipsecstack.runtime.node import Node


class Reloader:
    """SIGHUP: re-read the configuration and apply what changed without touching what did not.

    Manual connections that changed are reinstalled; IKE connections that were removed or changed
    are terminated (and their trap policies removed), new or changed ones get trap policies and are
    initiated when ``start_action = start``; unchanged connections keep their SAs. Changes to
    ``[agent]`` (backends, sockets, TUN) need a restart and are reported as such. An invalid file is
    reported and the running configuration stays.
    """

    def __init__(self, path: str, cfg: Config, node: Node, ike: Any, log: Any) -> None:
        self.path = path
        self.cfg = cfg
        self.node = node
        self.ike = ike
        self.log = log

    def __call__(self) -> None:
        try:
            new = load(self.path, os.environ)
        except Exception as e:  # a broken file, or one the (dropped) user cannot read: never fatal
            error = str(e) if isinstance(e, OSError | ConfigError) else f"{type(e).__name__}: {e}"
            hint = {}
            user = self.cfg.agent.user
            if user and (isinstance(e, PermissionError) or "Permission denied" in error):
                hint["hint"] = (
                    f"the daemon runs as {user!r} (agent.user): make the configuration and its key/secret "
                    "files readable by that user, or restart the daemon to apply changes"
                )
            self.log.error("reload failed; keeping the running configuration", error=error, **hint)
            return
        self.apply(new)

    def apply(self, new: Config) -> dict[str, list[str]]:
        old, dp, now = self.cfg, self.node.datapath, time.monotonic()
        force_encap(new, old.agent)  # as attach_ike did: the running outer plane decides
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        if new.agent != old.agent:
            self.log.warning("[agent] changed: restart the daemon to apply it (the rest is reloaded)")
        # manual connections
        old_m, new_m = {c.name: c for c in old.manual}, {c.name: c for c in new.manual}
        for name, c in old_m.items():
            if new_m.get(name) != c:
                for sa in [s for s in dp.sad if s.name == name and s.reqid is None]:
                    dp.remove(sa)
                for pol in [p for p in dp.spd if p.name == name]:
                    dp.spd.remove(pol)
        for name, c in new_m.items():
            if old_m.get(name) != c:
                for sa in manual_sas(c):
                    dp.install(sa, now)
                for pol in manual_policies(c):
                    dp.spd.add(pol)
        # IKE connections
        old_p, new_p = {p.name: p for p in old.connections}, {p.name: p for p in new.connections}
        for name in sorted(set(old_m) | set(new_m) | set(old_p) | set(new_p)):
            before, after = old_m.get(name) or old_p.get(name), new_m.get(name) or new_p.get(name)
            key = (
                "added"
                if before is None
                else "removed"
                if after is None
                else "unchanged"
                if before == after
                else "changed"
            )
            report[key].append(name)
        if self.ike is not None:
            traps = self.node.traps
            for name, peer in old_p.items():
                if new_p.get(name) == peer:
                    continue
                self.ike.terminate(name)
                for child in peer.children:
                    reqid = traps.pop((name, child.name), None)
                    for pol in [p for p in dp.spd if p.template is not None and p.template.reqid == reqid]:
                        dp.spd.remove(pol)
            self.ike.manager.peers = dict(new_p)
            self.ike.start_names = list(new.start)
            self.ike.acquire_names = set(new.trap)
            for name, peer in new_p.items():
                if old_p.get(name) == peer:
                    continue
                if peer.remote_addr is not None:
                    for child in peer.children:
                        reqid = max(traps.values(), default=TRAP_REQID_BASE - 1) + 1
                        traps[(name, child.name)] = reqid
                        for pol in trap_policies(name, peer.local_addr, peer.remote_addr, child, reqid):
                            dp.spd.add(pol)
                if name in new.start:
                    self.ike.initiate(name)
            self.ike.set_traps(traps)
        self.cfg = new
        self.log.info("configuration reloaded", **{k: v for k, v in report.items() if v})
        return report
