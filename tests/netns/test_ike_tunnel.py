"""IKEv2 between two ipsecstack daemons in namespaces: PSK, tunnel mode over TUN, ESP in UDP."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_tunnel import Daemon, _link_exists, _ping, _tcp_transfer

pytestmark = [pytest.mark.root]

CONFIG = """
[agent]
inner_backend = "tun"
outer_backend = "udp"
tun_name = "ipsec0"
tun_addrs = ["{tun_addr}"]
log_level = "info"

[connections.site]
local_addrs = ["{local}"]
remote_addrs = ["{remote}"]
proposals = ["{ike}"]
local = {{ auth = "psk", id = "{local_id}" }}
remote = {{ auth = "psk", id = "{remote_id}" }}

[connections.site.children.net]
local_ts = ["{lnet}"]
remote_ts = ["{rnet}"]
esp_proposals = ["{esp}"]
start_action = "{start}"

[secrets.ike.site]
secret = "{psk}"
"""


def _cfg(local: str, remote: str, tun_addr: str, lnet: str, rnet: str, ids: tuple[str, str], start: str,
         ike: str, esp: str, psk: str) -> str:  # fmt: skip
    return CONFIG.format(local=local, remote=remote, tun_addr=tun_addr, lnet=lnet, rnet=rnet, local_id=ids[0],
                         remote_id=ids[1], start=start, ike=ike, esp=esp, psk=psk)  # fmt: skip


def _site_configs(pair: nsutil.Pair, ike: str, esp: str, psk_a: str, psk_b: str | None = None) -> tuple[str, str]:
    """A (initiator, 10.1.0.0/16) and B (responder, 10.2.0.0/16) configurations for one site-to-site tunnel."""
    a = _cfg(pair.addr_a, pair.addr_b, "10.1.0.1/16", "10.1.0.0/16", "10.2.0.0/16", ("a.example", "b.example"),
             "start", ike, esp, psk_a)  # fmt: skip
    b = _cfg(pair.addr_b, pair.addr_a, "10.2.0.1/16", "10.2.0.0/16", "10.1.0.0/16", ("b.example", "a.example"),
             "none", ike, esp, psk_b or psk_a)  # fmt: skip
    return a, b


def _start(pair: nsutil.Pair, tmp_path: Path, cfg_a: str, cfg_b: str) -> tuple[Daemon, Daemon]:
    """Write both configurations, start the responder B, then the initiator A."""
    (tmp_path / "a.toml").write_text(cfg_a)
    (tmp_path / "b.toml").write_text(cfg_b)
    db = Daemon(pair.b, tmp_path / "b.toml")
    nsutil.wait_for(db.started, timeout=20, what="responder to start")
    return Daemon(pair.a, tmp_path / "a.toml"), db


@pytest.mark.parametrize(
    ("ike", "esp"),
    [("aes128gcm16-prfsha256-x25519", "aes128gcm16"), ("aes256-sha256-modp2048", "aes256-sha256")],
)
def test_ike_tunnel_between_two_daemons(ike: str, esp: str, tmp_path: Path) -> None:
    with nsutil.netns_pair("ik") as pair:
        da, db = _start(pair, tmp_path, *_site_configs(pair, ike, esp, "a long shared secret"))
        try:
            for d in (da, db):
                nsutil.wait_for(lambda d=d: "child sa installed" in d.output(), timeout=20,
                                what=f"child SA in {d.ns.name}:\n{d.output()}")  # fmt: skip
            assert "a long shared secret" not in da.output() + db.output()
            _ping(pair, "10.1.0.1", "10.2.0.1")
            nbytes, _secs = _tcp_transfer(pair, "10.2.0.1")
            assert nbytes > 1 << 20
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output() + db.output()
        assert "ike sa established" in da.output() and "ike sa established" in db.output()
        assert not _link_exists(pair.a, "ipsec0")


def test_wrong_psk_is_reported(tmp_path: Path) -> None:
    with nsutil.netns_pair("ik") as pair:
        a, b = _site_configs(pair, "aes128gcm16-prfsha256-x25519", "aes128gcm16", "secret one", "secret two")
        da, db = _start(pair, tmp_path, a, b)
        try:
            nsutil.wait_for(lambda: "AUTHENTICATION_FAILED" in da.output(), timeout=20, what="auth failure on A")
            nsutil.wait_for(lambda: "PSK differs" in db.output(), timeout=5, what="auth failure on B")
        finally:
            for d in (da, db):
                d.terminate()


def test_volume_lifetime_triggers_rekey(tmp_path: Path) -> None:
    """children.rekey_packets: the SA's soft packet limit makes the daemon rekey the child SA, losing nothing."""
    import re

    with nsutil.netns_pair("iv") as pair:
        a, b = _site_configs(pair, "aes128gcm16-prfsha256-x25519", "aes128gcm16", "volume secret")
        a = a.replace('start_action = "start"', 'start_action = "start"\nrekey_packets = 20\nlife_time = "2h"')
        da, db = _start(pair, tmp_path, a, b)
        try:
            nsutil.wait_for(lambda: "child sa installed" in da.output(), timeout=20, what=da.output())
            r = pair.a.run("ping", "-n", "-c", "50", "-i", "0.05", "-W", "2", "-I", "10.1.0.1", "10.2.0.1",
                           check=False, timeout=30)  # fmt: skip
            out = r.stdout.decode()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert m is not None and m.group(1) == m.group(2), out + da.output()
            assert "child sa lifetime" in da.output() and "child sa rekeyed" in da.output(), da.output()
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0]
