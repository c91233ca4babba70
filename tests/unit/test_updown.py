"""runtime/updown.py: strongSwan's environment for updown scripts, and running them off the event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

from ipsecstack.ike.session import ChildUp, IkeSa
from ipsecstack.ike.ts import Range
from ipsecstack.runtime.updown import Updown, environment
from tests.ike.helpers import Wire, ike_config


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.records.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.records.append(("warning", event, kw))


def _up(local: str = "10.1.0.0/16", remote: str = "10.2.0.0/16", a: str = "172.31.0.1", b: str = "172.31.0.2",
        encap: bool = False) -> ChildUp:  # fmt: skip
    cfg_i, cfg_r = ike_config(a, b, local, remote), ike_config(b, a, remote, local)
    cfg_i.encap = encap
    w = Wire(cfg_i, cfg_r)
    w.run()
    ev = next(e for e in w.i.events() if isinstance(e, ChildUp))
    return ev


def _r(cidr: str) -> Range:
    n = ipaddress.ip_network(cidr)
    return Range(n.network_address, n.broadcast_address)


def test_environment_is_strongswans() -> None:
    ev = _up()
    env = environment(ev, 7, True, ev.local_ts[0], ev.remote_ts[0], unique_id=3, interface="ipsec0")
    assert {k: v for k, v in env.items() if k != "PATH"} == {
        "PLUTO_VERSION": "1.1", "PLUTO_VERB": "up-client", "PLUTO_CONNECTION": "net", "PLUTO_INTERFACE": "ipsec0",
        "PLUTO_REQID": "7", "PLUTO_PROTO": "esp", "PLUTO_UNIQUEID": "3", "PLUTO_ME": "172.31.0.1",
        "PLUTO_MY_ID": "172.31.0.1", "PLUTO_MY_CLIENT": "10.1.0.0/16", "PLUTO_MY_PORT": "0",
        "PLUTO_MY_PROTOCOL": "0", "PLUTO_PEER": "172.31.0.2", "PLUTO_PEER_ID": "172.31.0.2",
        "PLUTO_PEER_CLIENT": "10.2.0.0/16", "PLUTO_PEER_PORT": "0", "PLUTO_PEER_PROTOCOL": "0",
    }  # fmt: skip
    down = environment(ev, 7, False, ev.local_ts[0], ev.remote_ts[0], unique_id=3, interface=None)
    assert down["PLUTO_VERB"] == "down-client" and down["PLUTO_INTERFACE"] == "unknown"
    # a range that is not a prefix: the smallest prefix holding it, as strongSwan's to_subnet
    ranged = environment(ev, 7, True, Range(ipaddress.ip_address("10.1.0.3"), ipaddress.ip_address("10.1.0.9")),
                         ev.remote_ts[0], unique_id=3, interface=None)  # fmt: skip
    assert ranged["PLUTO_MY_CLIENT"] == "10.1.0.0/28"


def test_environment_host_v6_and_encapsulation() -> None:
    host = _up("172.31.0.1/32", "172.31.0.2/32")
    env = environment(host, 1, True, host.local_ts[0], host.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_VERB"] == "up-host" and env["PLUTO_MY_CLIENT"] == "172.31.0.1/32"
    assert "PLUTO_UDP_ENC" not in env
    v6 = _up("fd01::/64", "fd02::/64", a="fd00::1", b="fd00::2")
    env = environment(v6, 1, False, v6.local_ts[0], v6.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_VERB"] == "down-client-v6" and env["PLUTO_PEER_CLIENT"] == "fd02::/64"
    v6host = _up("fd00::1/128", "fd00::2/128", a="fd00::1", b="fd00::2")
    env = environment(v6host, 1, True, v6host.local_ts[0], v6host.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_VERB"] == "up-host-v6"
    enc = _up(encap=True)
    env = environment(enc, 1, True, enc.local_ts[0], enc.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_UDP_ENC"] == "4500"


def test_virtual_ips(monkeypatch: Any) -> None:
    ev = _up()
    monkeypatch.setattr(IkeSa, "peer_virtual_ip", property(lambda self: "10.9.0.1"))
    ev.sa.virtual_ip = "10.8.0.7"
    env = environment(ev, 1, True, ev.local_ts[0], ev.remote_ts[0], unique_id=1, interface=None)
    assert env["PLUTO_MY_SOURCEIP"] == "10.8.0.7" and env["PLUTO_PEER_SOURCEIP"] == "10.9.0.1"


def _script(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "updown.sh"
    f.write_text("#!/bin/sh\n" + body)
    f.chmod(0o755)
    return f


def test_scripts_run_in_order_off_the_loop_and_failures_are_only_logged(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    script = _script(tmp_path, f'echo "$PLUTO_VERB $PLUTO_REQID $1" >> {out}\necho said "$PLUTO_VERB"\n'
                     '[ "$PLUTO_REQID" = 2 ] && exit 3\nexit 0\n')  # fmt: skip
    ev = _up()
    ev.child.updown = (str(script), "arg1")
    log = Log()
    runner = Updown(log, interface="ipsec0")
    ticks: list[int] = []

    async def main() -> None:
        runner.up(ev, 1, 1)
        runner.rekeyed(ev, 1)  # no script for a rekey
        runner.up(ev, 2, 1)  # this one exits 3
        runner.down(1)
        runner.down(99)  # never up: nothing
        for i in range(200):  # the loop keeps running while scripts run
            ticks.append(i)
            if len(log.records) == 3:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert out.read_text().splitlines() == ["up-client 1 arg1", "up-client 2 arg1", "down-client 1 arg1"]
    assert len(ticks) > 1
    kinds = [(level, event, kw["verb"], kw["exit_code"]) for level, event, kw in log.records]
    assert kinds == [("info", "updown", "up-client", 0), ("warning", "updown script failed", "up-client", 3),
                     ("info", "updown", "down-client", 0)]  # fmt: skip
    assert log.records[0][2]["output"] == "said up-client" and "exit code 3" in log.records[1][2]["error"]
    # shutdown: reqid 2 is still up, so its down script runs (synchronously)
    runner.close()
    assert out.read_text().splitlines()[-1] == "down-client 2 arg1" and runner.failures == 2


def test_a_hanging_or_missing_script_never_breaks_anything(tmp_path: Path) -> None:
    script = _script(tmp_path, "sleep 30\n")  # its child keeps the output pipe open: the group is killed
    ev = _up()
    ev.child.updown = (str(script),)
    log = Log()
    runner = Updown(log, timeout=0.3)

    async def main() -> None:
        runner.up(ev, 1, 1)
        for _ in range(100):
            if log.records:
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    ((level, event, kw),) = log.records
    assert (
        (level, event) == ("warning", "updown script failed")
        and "killed after 0.3s" in kw["error"]
        and kw["exit_code"] is None
    )
    script.unlink()  # removed after the configuration was checked
    runner.close()  # the down of reqid 1 cannot start: logged, not raised
    assert "cannot start it" in log.records[-1][2]["error"]
    assert json.dumps([r[2] for r in log.records], default=str)  # everything logged is serialisable
