"""ipsecstack reauthenticates (``reauth_time``) against strongSwan's charon, make-before-break.

charon (the responder, ``unique = no``) sees a second IKE SA of the same peer without INITIAL_CONTACT,
keeps both, and then gets a DELETE for the old one: it must end with exactly one IKE SA, the new one,
while a steady ping through the tunnel keeps flowing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop import strongswan as sw
from tests.interop.test_strongswan import PSK, _flood_ping, _require, _setup
from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _ping

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_ipsecstack_reauthenticates_against_strongswan_under_ping(tmp_path: Path) -> None:
    _require()
    with nsutil.netns_pair("ia") as pair:
        path = _setup(pair, tmp_path, start="start", extra_conn='reauth_time = "5s"\n')
        with sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, psk=PSK, local_ts="10.2.0.0/16",
                           remote_ts="10.1.0.0/16", conn="swan", child="net") as swan:  # fmt: skip
            d = Daemon(pair.a, path)
            try:
                nsutil.wait_for(lambda: "child sa installed" in d.output(), timeout=30, what=f"child SA\n{d.output()}")
                first = swan.wait_established(timeout=10)[0].info["initiator-spi"]
                sent, got, out = _flood_ping(pair, 120)  # 12 s: two reauthentications at ~4.5-5 s intervals
                reauths = d.output().count("ike sa reauthenticated")
                assert reauths >= 2, d.output() + swan.log_tail(80)
                assert sent - got <= 1, (
                    f"lost {sent - got} of {sent} pings over {reauths} reauths:\n{out}\n{d.output()}"
                )
                assert f"old_spi_i={first}" in d.output(), d.output()

                def settled() -> bool:  # one IKE SA in charon: the newest one ipsecstack reauthenticated to
                    sas = swan.list_sas()
                    if len(sas) != 1 or sas[0].state != "ESTABLISHED" or sas[0].child("net") is None:
                        return False
                    spi = sas[0].info["initiator-spi"].removeprefix("0x")
                    lines = [ln for ln in d.output().splitlines() if "ike sa reauthenticated" in ln]
                    return spi != first.removeprefix("0x") and f" spi_i={spi}" in lines[-1]

                nsutil.wait_for(
                    settled, timeout=10, what=f"charon with one IKE SA\n{swan.list_sas_text()}\n{d.output()}"
                )
                assert "ike sa down" not in d.output() and "reauthentication failed" not in d.output(), d.output()
                _ping(pair, "10.1.0.1", "10.2.0.1")  # the new child SA carries traffic
            finally:
                assert d.terminate() == 0, d.output()
