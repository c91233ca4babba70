"""``[agent] user``: the daemon drops root after start-up, keeps three capabilities, and still works.

Real daemons in namespaces (manual keys): a TUN tunnel and an NFQUEUE transport pair. Each checks the
process's credentials in /proc, traffic through the SAs, the CLI over the control socket (as root),
a SIGHUP reload of a file the dropped user cannot read (reported, not fatal) and the clean-up at
SIGTERM (TUN device gone, iptables rules gone), which the dropped process does with its ambient
capabilities.
"""

from __future__ import annotations

import json
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_transport_nfqueue import _save, start_agent, stop
from tests.netns.test_tunnel import TUN, VARIANTS, Daemon, _configs, _link_exists, _ping

pytestmark = [pytest.mark.root]

NOBODY = pwd.getpwnam("nobody")
KEPT = 0x3400  # CAP_NET_BIND_SERVICE (10) | CAP_NET_ADMIN (12) | CAP_NET_RAW (13)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _dropped(pid: int) -> bool:
    return _status(pid)["Uid"].split() == [str(NOBODY.pw_uid)] * 4


def _assert_dropped(pid: int) -> None:
    st = _status(pid)
    assert st["Uid"].split() == [str(NOBODY.pw_uid)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(NOBODY.pw_gid)] * 4, st["Gid"]
    assert "0" not in st["Groups"].split(), st["Groups"]
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(st[key], 16) == KEPT, f"{key} = {st[key]}"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as root, from the host: the control socket is a path, reachable from any namespace."""
    return subprocess.run([sys.executable, "-m", "ipsecstack", *args], capture_output=True, text=True, timeout=30)


def _with_user(config: str, sock: Path) -> str:
    return config.replace("[agent]\n", f'[agent]\nuser = "nobody"\ncontrol_socket = "{sock}"\n', 1)


def test_tun_tunnel_as_nobody(tmp_path: Path) -> None:
    variant = next(v for v in VARIANTS if v.id == "raw-ipv4-aes128gcm16")
    with nsutil.netns_pair("pd") as pair:
        cfg_a, cfg_b, inner_a, inner_b = _configs(variant, pair)
        socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
        for name, text, sock in (("a", cfg_a, socks[0]), ("b", cfg_b, socks[1])):
            (tmp_path / f"{name}.toml").write_text(_with_user(text, sock))
            (tmp_path / f"{name}.toml").chmod(0o600)  # root's: nobody cannot re-read it on SIGHUP
        daemons = [Daemon(pair.a, tmp_path / "a.toml"), Daemon(pair.b, tmp_path / "b.toml")]
        try:
            for d in daemons:
                nsutil.wait_for(lambda d=d: d.started() and "privileges dropped" in d.output(), timeout=20,
                                what=f"ipsecstack in {d.ns.name} to drop privileges")  # fmt: skip
                _assert_dropped(d.proc.pid)
                out = d.output()
                assert "caps=['CAP_NET_BIND_SERVICE', 'CAP_NET_ADMIN', 'CAP_NET_RAW']" in out
                assert out.index("privileges dropped") < out.index("node started"), out  # no packet read as root
                assert _link_exists(d.ns, TUN)
            _ping(pair, inner_a, inner_b)
            status = cli("status", "--socket", str(socks[0]), "--json")
            assert status.returncode == 0, status.stderr
            st = json.loads(status.stdout)
            assert st["out_packets"] >= 3
            # the TUN ring sized to [agent] tun_queue_kb's default, as nobody (CAP_NET_ADMIN kept for it)
            assert st["tun_queue"]["running"] and st["tun_queue"]["budget_kb"] == 1024, st
            sas = cli("list-sas", "--socket", str(socks[0]), "--json")
            assert sas.returncode == 0, sas.stderr
            (manual,) = json.loads(sas.stdout)
            assert {s["spi"] for s in manual["sas"]} == {"0x00001001", "0x00002001"}
            # SIGHUP: the file is root's (0600); the reload says so and the tunnel keeps working
            daemons[0].proc.send_signal(signal.SIGHUP)
            nsutil.wait_for(lambda: "reload failed" in daemons[0].output(), timeout=10, what=daemons[0].output())
            assert "Permission denied" in daemons[0].output() and "readable by that user" in daemons[0].output()
            _ping(pair, inner_a, inner_b)
            _assert_dropped(daemons[0].proc.pid)
        finally:
            codes = [d.terminate() for d in daemons]
        for d, rc in zip(daemons, codes, strict=True):
            assert rc == 0, f"ipsecstack in {d.ns.name} exited with {rc}:\n{d.output()}"
            assert "node stopped" in d.output() and "Traceback" not in d.output(), d.output()
            nsutil.wait_for(lambda d=d: not _link_exists(d.ns, TUN), timeout=5, what="the TUN device to go")
            routes = d.ns.run("ip", "route").stdout.decode()
            assert "10.1.0.0/16" not in routes and "10.2.0.0/16" not in routes, routes


def test_nfqueue_transport_as_nobody(tmp_path: Path) -> None:
    with nsutil.netns_pair("pq") as pair:
        socks = {"a": tmp_path / "qa.sock", "b": tmp_path / "qb.sock"}
        agents = {
            side: start_agent(pair, side, tmp_path, agent_extra=f'user = "nobody"\ncontrol_socket = "{socks[side]}"')
            for side in ("a", "b")
        }
        try:
            for p in agents.values():
                nsutil.wait_for(lambda p=p: _dropped(p.pid), timeout=10, what="the agent to drop privileges")
                _assert_dropped(p.pid)
            res = pair.a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", pair.addr_b, check=False, timeout=15)
            assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
            status = cli("status", "--socket", str(socks["a"]), "--json")
            assert status.returncode == 0, status.stderr
            counters = json.loads(status.stdout)
            assert counters["out_packets"] >= 3 and counters["in_packets"] >= 3, counters
            assert cli("list-sas", "--socket", str(socks["b"])).returncode == 0
        finally:
            results = {side: stop(p) for side, p in agents.items()}
        for rc, err in results.values():
            assert rc == 0, err
            assert '"event": "privileges dropped"' in err and '"uid": 65534' in err, err
            assert "nfqueue rules removed" in err and "Traceback" not in err, err
        for ns in (pair.a, pair.b):
            assert "IPSECSTACK" not in _save(ns) + _save(ns, v6=True)


def test_ike_tunnel_as_nobody(tmp_path: Path) -> None:
    """IKEv2 (port 500, then 4500) negotiated, rekeyed and deleted by two daemons running as nobody."""
    import re

    from tests.netns.test_ike_tunnel import _site_configs, _start

    with nsutil.netns_pair("pi") as pair:
        a, b = _site_configs(pair, "aes128gcm16-prfsha256-x25519", "aes128gcm16", "privdrop secret")
        a = a.replace('start_action = "start"', 'start_action = "start"\nrekey_packets = 20\nlife_time = "2h"')
        da, db = _start(pair, tmp_path, _with_user(a, tmp_path / "a.sock"), _with_user(b, tmp_path / "b.sock"))
        try:
            nsutil.wait_for(lambda: "child sa installed" in da.output(), timeout=20, what=da.output())
            for d in (da, db):
                assert "privileges dropped" in d.output(), d.output()
                _assert_dropped(d.proc.pid)
            r = pair.a.run("ping", "-n", "-c", "50", "-i", "0.05", "-W", "2", "-I", "10.1.0.1", "10.2.0.1",
                           check=False, timeout=30)  # fmt: skip
            m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout.decode())
            assert m is not None and m.group(1) == m.group(2), r.stdout.decode() + da.output()
            assert "child sa rekeyed" in da.output(), da.output()
            sas = json.loads(cli("list-sas", "--socket", str(tmp_path / "a.sock"), "--json").stdout)
            assert sas[0]["state"] == "established", sas
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        assert "Traceback" not in da.output() + db.output(), da.output() + db.output()


def _kex_worker(daemon_pid: int) -> int:
    """The pid of the daemon's key-pair worker process (runtime/kexworker.py)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = _status(int(proc.name))["PPid"]
                cmdline = (proc / "cmdline").read_bytes()
            except (OSError, KeyError):
                continue
            if ppid == str(daemon_pid) and b"ipsecstack.runtime.kexworker" in cmdline:
                return int(proc.name)
    raise AssertionError(f"no key-pair worker under pid {daemon_pid}")


def test_ike_modp_key_pair_worker_as_nobody(tmp_path: Path) -> None:
    """MODP key pairs come from a worker process, started before the drop, that runs as nobody without any
    capability; the responder answers IKE_SA_INIT with one of them; the worker goes with the daemon."""
    from tests.netns.test_ike_tunnel import _site_configs

    with nsutil.netns_pair("pk") as pair:
        a, b = _site_configs(pair, "aes128-sha256-modp3072", "aes128gcm16", "privdrop secret")
        socks = {"a": tmp_path / "a.sock", "b": tmp_path / "b.sock"}
        for name, text in (("a", a), ("b", b)):
            (tmp_path / f"{name}.toml").write_text(_with_user(text, socks[name]))
        db = Daemon(pair.b, tmp_path / "b.toml")
        daemons, workers = [db], {}
        try:

            def pool(sock: Path) -> dict[str, int]:
                res = cli("status", "--socket", str(sock), "--json")
                return dict(json.loads(res.stdout)["ike"]["keypairs"]) if res.returncode == 0 else {}

            nsutil.wait_for(lambda: db.started() and pool(socks["b"]).get("made", 0) >= 1, timeout=20,
                            what=f"the responder's pool to fill:\n{db.output()}")  # fmt: skip
            da = Daemon(pair.a, tmp_path / "a.toml")
            daemons.append(da)
            for d in daemons:
                nsutil.wait_for(lambda d=d: "child sa installed" in d.output(), timeout=20, what=d.output())
            # A's IKE SA may be up before its worker has started (its first pair was made inline); the worker
            # becomes nobody before it answers anything
            nsutil.wait_for(lambda: pool(socks["a"]).get("made", 0) >= 1, timeout=20, what="the initiator's pool")
            for d in daemons:
                _assert_dropped(d.proc.pid)
                wpid = workers[d.ns.name] = _kex_worker(d.proc.pid)
                st = _status(wpid)
                assert st["Uid"].split() == [str(NOBODY.pw_uid)] * 4 and st["Gid"].split() == [str(NOBODY.pw_gid)] * 4
                assert all(int(st[k], 16) == 0 for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")), st
                assert st["NoNewPrivs"] == "1", st
            stats_b = pool(socks["b"])
            assert stats_b["taken"] >= 1 and stats_b["worker_started"] == 1 and "worker_died" not in stats_b, stats_b
            r = pair.a.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-I", "10.1.0.1", "10.2.0.1",
                           check=False, timeout=15)  # fmt: skip
            assert r.returncode == 0, r.stdout.decode() + da.output()
        finally:
            codes = [d.terminate() for d in daemons]
        assert codes == [0] * len(daemons), "".join(d.output() for d in daemons)
        assert "Traceback" not in "".join(d.output() for d in daemons)
        for wpid in workers.values():
            nsutil.wait_for(lambda wpid=wpid: not Path(f"/proc/{wpid}").exists(), timeout=5, what="the worker to go")


# Runs in a namespace as root: load the config, optionally become nobody, then run the daemon.
RUN_AS = """
import os, sys
from ipsecstack import cli
from ipsecstack.config import load
import ipsecstack.agent, ipsecstack.runtime.logs, ipsecstack.runtime.loop, ipsecstack.runtime.privs
import structlog, asyncio
try:
    import uvloop
except ImportError:
    pass
cfg = load(sys.argv[1], os.environ)
if sys.argv[2] == "nobody":  # the stdlib may sit under /root (mode 700): everything is imported above
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(cli.run_daemon(cfg, sys.argv[1]))
"""


def test_refused_without_the_privileges_to_drop(tmp_path: Path) -> None:
    """Not root, or root without CAP_SETUID/CAP_SETGID (a too tight systemd bounding set): a clear error,
    exit 3, and nothing opened."""
    variant = next(v for v in VARIANTS if v.id == "raw-ipv4-aes128gcm16")
    with nsutil.netns_pair("pr") as pair:
        cfg_a = _configs(variant, pair)[0]
        path = tmp_path / "a.toml"
        path.write_text(_with_user(cfg_a, tmp_path / "a.sock"))
        p = pair.a.popen(sys.executable, "-c", RUN_AS, str(path), "nobody")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 3, out + err
        assert b"agent.user = 'nobody': dropping privileges needs the daemon started as root" in err, err
        p = pair.a.popen("setpriv", "--bounding-set", "-setuid,-setgid", sys.executable, "-m", "ipsecstack", "run",
                         "-c", str(path))  # fmt: skip
        out, err = p.communicate(timeout=30)
        assert p.returncode == 3, out + err
        assert b"needs CAP_SETUID, CAP_SETGID, which this process lacks" in err, err
        assert not _link_exists(pair.a, TUN) and not (tmp_path / "a.sock").exists()
