"""Two daemons in namespaces: updown scripts, dpd_action = restart, close_action = start/trap (swanctl keys)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_ike_tunnel import _site_configs, _start
from tests.netns.test_tunnel import Daemon, _ping

pytestmark = [pytest.mark.root]

IKE, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"


def _configs(pair: nsutil.Pair, tmp_path: Path, *, a_conn: str = "", a_child: str = "", b_child: str = "",
             psk: str = "actions test secret", b_conn: str = "") -> tuple[str, str]:  # fmt: skip
    """The two site configurations with a control socket each, quick retransmissions (dead in ~2 s) and
    extra lines for each side's connection and child."""
    a, b = _site_configs(pair, IKE, ESP, psk)
    out = []
    for name, text, conn, child in (("a", a, a_conn, a_child), ("b", b, b_conn, b_child)):
        agent = (f'log_level = "info"\ncontrol_socket = "{tmp_path / name}.sock"\nretransmit_timeout = 0.5\n'
                 "retransmit_base = 1.5\nretransmit_tries = 2")  # fmt: skip
        text = text.replace('log_level = "info"', agent)
        text = text.replace("[connections.site.children.net]", f"{conn}\n\n[connections.site.children.net]")
        text = text.replace('esp_proposals = ["aes128gcm16"]', f'esp_proposals = ["aes128gcm16"]\n{child}')
        out.append(text)
    return out[0], out[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsecstack", *args], capture_output=True, text=True, timeout=30)


def _count(d: Daemon, text: str) -> int:
    return d.output().count(text)


def _wait_children(*pairs: tuple[Daemon, int]) -> None:
    for d, n in pairs:
        nsutil.wait_for(lambda d=d, n=n: _count(d, "child sa installed") >= n, timeout=15,  # type: ignore[misc]
                        what=f"{n} child SA(s) in {d.ns.name}:\n{d.output()}")  # fmt: skip


def _env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_updown_runs_with_strongswan_environment_on_up_and_down(tmp_path: Path) -> None:
    with nsutil.netns_pair("iu") as pair:
        envdir = tmp_path / "env"
        envdir.mkdir()
        script = tmp_path / "updown.sh"
        # written to a temp file then renamed: the test never sees a half-written file
        script.write_text(f"#!/bin/sh\nenv | grep '^PLUTO_' | sort > {envdir}/.tmp\n"
                          f"mv {envdir}/.tmp {envdir}/$PLUTO_VERB.env\necho hello $1\n")  # fmt: skip
        script.chmod(0o755)
        failing = tmp_path / "failing.sh"
        failing.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
        failing.chmod(0o755)
        a, b = _configs(pair, tmp_path, a_child=f'updown = "{script} world"', b_child=f'updown = "{failing}"')
        da, db = _start(pair, tmp_path, a, b)
        try:
            _wait_children((da, 1), (db, 1))
            nsutil.wait_for(lambda: (envdir / "up-client.env").exists(), timeout=10, what=da.output())
            up = _env(envdir / "up-client.env")
            assert up["PLUTO_VERB"] == "up-client" and up["PLUTO_VERSION"] == "1.1", up
            assert (up["PLUTO_CONNECTION"], up["PLUTO_INTERFACE"], up["PLUTO_PROTO"]) == ("net", "ipsec0", "esp")
            assert (up["PLUTO_ME"], up["PLUTO_PEER"]) == (pair.addr_a, pair.addr_b)
            assert (up["PLUTO_MY_ID"], up["PLUTO_PEER_ID"]) == ("a.example", "b.example")
            assert (up["PLUTO_MY_CLIENT"], up["PLUTO_PEER_CLIENT"]) == ("10.1.0.0/16", "10.2.0.0/16")
            assert up["PLUTO_UDP_ENC"] == "4500" and int(up["PLUTO_REQID"]) > 0 and up["PLUTO_UNIQUEID"] == "1"
            nsutil.wait_for(lambda: "hello world" in da.output(), timeout=5, what=da.output())  # output is logged
            # B's script fails: logged with its exit code, and B carries traffic all the same
            nsutil.wait_for(lambda: "updown script failed" in db.output(), timeout=10, what=db.output())
            assert "exit_code=3" in db.output() and "broken" in db.output(), db.output()
            _ping(pair, "10.1.0.1", "10.2.0.1")
            assert not (envdir / "down-client.env").exists()
            r = _cli("terminate", "--socket", f"{tmp_path / 'a'}.sock", "site")
            assert r.returncode == 0, r.stderr
            nsutil.wait_for(lambda: (envdir / "down-client.env").exists(), timeout=10, what=da.output())
            down = _env(envdir / "down-client.env")
            assert down["PLUTO_VERB"] == "down-client"
            assert {k: v for k, v in down.items() if k != "PLUTO_VERB"} == {
                k: v for k, v in up.items() if k != "PLUTO_VERB"
            }
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        assert _count(da, "verb=up-client") == 1  # once: no rekey, no second up


def test_dpd_action_restart_reestablishes_after_the_peer_is_killed_and_restarted(tmp_path: Path) -> None:
    with nsutil.netns_pair("id") as pair:
        a, b = _configs(pair, tmp_path, a_conn='dpd_delay = "1s"', a_child='dpd_action = "restart"')
        da, db = _start(pair, tmp_path, a, b)
        db2 = None
        try:
            _wait_children((da, 1), (db, 1))
            db.proc.kill()  # no DELETE: only DPD can tell
            db.proc.wait(timeout=10)
            db2 = Daemon(pair.b, tmp_path / "b.toml")  # a fresh peer without the old IKE SA
            nsutil.wait_for(db2.started, timeout=20, what="restarted responder")
            nsutil.wait_for(lambda: "connection restarted" in da.output(), timeout=15, what=da.output())
            assert "cause=dead" in da.output() and "dead peer" in da.output()
            _wait_children((da, 2), (db2, 1))
            _ping(pair, "10.1.0.1", "10.2.0.1")
        finally:
            codes = [d.terminate() for d in (da, db2) if d is not None]
            db.terminate()
        assert codes == [0, 0], da.output()


@pytest.mark.parametrize("action", ["start", "trap"])
def test_close_action_when_the_peer_terminates(action: str, tmp_path: Path) -> None:
    with nsutil.netns_pair("ic") as pair:
        a, b = _configs(pair, tmp_path, a_child=f'close_action = "{action}"')
        da, db = _start(pair, tmp_path, a, b)
        try:
            _wait_children((da, 1), (db, 1))
            nsutil.wait_for(lambda: Path(f"{tmp_path / 'b'}.sock").exists(), timeout=10, what="B's control socket")
            r = _cli("terminate", "--socket", f"{tmp_path / 'b'}.sock", "site")
            assert r.returncode == 0, r.stderr
            nsutil.wait_for(lambda: "peer deleted the IKE SA" in da.output(), timeout=10, what=da.output())
            if action == "start":
                nsutil.wait_for(lambda: "connection restarted" in da.output(), timeout=5, what=da.output())
            else:
                nsutil.wait_for(lambda: "trap armed" in da.output(), timeout=5, what=da.output())
                assert _count(da, "ike initiating") == 1  # nothing until traffic needs the tunnel
                # traffic hits the trap policy: acquire, negotiate, then the pings get through
                pair.a.run("ping", "-n", "-c", "3", "-i", "0.3", "-W", "1", "-I", "10.1.0.1", "10.2.0.1",
                           check=False, timeout=20)  # fmt: skip
                assert "acquire" in da.output(), da.output()
            _wait_children((da, 2), (db, 2))
            assert _count(da, "ike initiating") == 2
            _ping(pair, "10.1.0.1", "10.2.0.1")
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()


def _liveness(sock: Path) -> tuple[int, float]:
    """The established IKE SA of ``site``: its DPD checks so far, and how long ago it heard from the peer."""
    r = _cli("list-sas", "--socket", str(sock), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (sa,) = [e for e in json.loads(r.stdout) if e["name"] == "site" and e["state"] == "established"]
    return int(sa["stats"].get("dpd_checks", 0)), float(sa["heard_ago"])


def test_dpd_waits_while_esp_arrives_and_checks_once_it_stops(tmp_path: Path) -> None:
    """RFC 7296 §2.4: ESP from the peer proves it alive. The datapath reports inbound traffic per SA (the
    native engine's "seen" events), so A sends no DPD request while B's replies arrive, and one soon after."""
    with nsutil.netns_pair("iq") as pair:
        a, b = _configs(pair, tmp_path, a_conn='dpd_delay = "2s"')
        da, db = _start(pair, tmp_path, a, b)
        sock = tmp_path / "a.sock"
        try:
            _wait_children((da, 1), (db, 1))
            ping = ("ping", "-n", "-q", "-c", "70", "-i", "0.1", "-W", "1", "-I", "10.1.0.1", "10.2.0.1")
            flow = threading.Thread(target=pair.a.run, args=ping, kwargs={"check": False, "timeout": 30})
            flow.start()
            time.sleep(1.5)  # a check from before the first reply may still be counted
            before, _ = _liveness(sock)
            time.sleep(4.5)  # more than twice dpd_delay of replies
            during, heard_ago = _liveness(sock)
            flow.join(timeout=30)
            assert during == before, f"DPD checks while ESP arrived: {before} -> {during}\n{da.output()}"
            assert heard_ago < 2.0
            nsutil.wait_for(lambda: _liveness(sock)[0] > during, timeout=10,
                            what=f"a DPD check once the ESP stopped:\n{da.output()}")  # fmt: skip
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output()
