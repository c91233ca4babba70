"""Two daemons in namespaces: ``reauth_time`` reauthenticates make-before-break under a steady ping.

A has ``reauth_time = "6s"``: every ~6 s it negotiates a new IKE SA with B (IKE_SA_INIT, IKE_AUTH, the
child) and then deletes the old one. The ping must not notice, the IKE SPIs change, the old IKE SA is
gone on both sides, and neither updown scripts nor B's close_action run for it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.netns import nsutil
from tests.netns.test_ike_actions import _cli, _configs, _count, _wait_children
from tests.netns.test_ike_tunnel import _start

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _sas(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    r = _cli("list-sas", "--json", "--socket", f"{tmp_path / name}.sock")
    assert r.returncode == 0, r.stderr
    return [e for e in json.loads(r.stdout) if "children" in e]


def test_reauthentication_under_ping_loses_nothing_and_runs_no_actions(tmp_path: Path) -> None:
    with nsutil.netns_pair("ir") as pair:
        script = tmp_path / "updown.sh"
        script.write_text(f'#!/bin/sh\necho "$PLUTO_VERB $PLUTO_REQID" >> {tmp_path}/verbs.$1\n')
        script.chmod(0o755)
        a, b = _configs(pair, tmp_path, a_conn='reauth_time = "6s"',
                        a_child=f'updown = "{script} a"\ndpd_action = "restart"',
                        b_child=f'updown = "{script} b"\nclose_action = "trap"')  # fmt: skip
        da, db = _start(pair, tmp_path, a, b)
        try:
            _wait_children((da, 1), (db, 1))
            for n in ("a", "b"):
                nsutil.wait_for(lambda n=n: Path(f"{tmp_path / n}.sock").exists(), timeout=10,  # type: ignore[misc]
                                what=f"control socket {n}")  # fmt: skip
            (first,) = _sas(tmp_path, "a")
            assert first["reauth_at"] is not None and _sas(tmp_path, "b")[0]["reauth_at"] is None
            # 10 pings a second for 15 s: two or three reauthentications at ~5.4-6 s intervals
            r = pair.a.run("ping", "-n", "-c", "150", "-i", "0.1", "-W", "2", "-I", "10.1.0.1", "10.2.0.1",
                           check=False, timeout=60)  # fmt: skip
            out = r.stdout.decode(errors="replace")
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m is not None, out
            sent, got = int(m.group(1)), int(m.group(2))
            reauths = _count(da, "ike sa reauthenticated")
            assert reauths >= 2, da.output()
            assert sent - got <= 1, f"lost {sent - got} of {sent} pings across {reauths} reauths:\n{out}\n{da.output()}"
            assert f"old_spi_i={first['spi_i']}" in da.output(), da.output()

            def settled() -> bool:  # one IKE SA on each side, the same one, with its child (no reauth under way)
                sa_a, sa_b = _sas(tmp_path, "a"), _sas(tmp_path, "b")
                return (len(sa_a) == len(sa_b) == 1 and sa_a[0]["spi_i"] == sa_b[0]["spi_i"]
                        and sa_a[0]["state"] == sa_b[0]["state"] == "established"
                        and len(sa_a[0]["children"]) == len(sa_b[0]["children"]) == 1)  # fmt: skip

            nsutil.wait_for(settled, timeout=10, what=f"one IKE SA on each side\n{da.output()}\n{db.output()}")
            (now_a,) = _sas(tmp_path, "a")
            assert (now_a["spi_i"], now_a["spi_r"]) != (first["spi_i"], first["spi_r"])
            assert first["spi_i"] not in json.dumps(_sas(tmp_path, "b"))  # the old IKE SA is gone on B too
            assert _count(db, "old ike sa closed after reauthentication") >= reauths  # B: cause reauth, not peer
            for text in ("ike sa down", "trap armed", "connection restarted", "reauthentication failed"):
                assert text not in da.output() + db.output(), da.output() + db.output()
            # the new child SAs took over the old reqid: policies kept, no updown script run
            assert "continues=True" in da.output() and "continues=True" in db.output()
            for n in ("a", "b"):
                verbs = (tmp_path / f"verbs.{n}").read_text().splitlines()
                assert len(verbs) == 1 and verbs[0].startswith("up-client "), verbs
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        for n in ("a", "b"):  # the one down at shutdown, for the reqid that came up
            verbs = (tmp_path / f"verbs.{n}").read_text().splitlines()
            assert [v.split()[0] for v in verbs] == ["up-client", "down-client"], verbs
            assert verbs[0].split()[1] == verbs[1].split()[1]
