"""SIGHUP reloads the configuration: unchanged connections keep their SAs, changed ones renegotiate."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.test_ike_tunnel import _site_configs, _start
from tests.netns.test_tunnel import _ping

pytestmark = [pytest.mark.root]


def test_sighup_reload(tmp_path: Path) -> None:
    with nsutil.netns_pair("rl") as pair:
        a, b = _site_configs(pair, "aes128gcm16-prfsha256-x25519", "aes128gcm16", "reload secret")
        b = b.replace('esp_proposals = ["aes128gcm16"]', 'esp_proposals = ["aes128gcm16", "aes256-sha256"]')
        da, db = _start(pair, tmp_path, a, b)
        cfg_a = tmp_path / "a.toml"
        try:
            nsutil.wait_for(lambda: "child sa installed" in da.output(), timeout=20, what=da.output())
            _ping(pair, "10.1.0.1", "10.2.0.1")
            # 1. nothing changed: nothing is touched
            da.proc.send_signal(signal.SIGHUP)
            nsutil.wait_for(lambda: "unchanged=['site']" in da.output(), timeout=10, what=da.output())
            assert "ike sa down" not in da.output()
            # 2. a broken file: reported, the running configuration stays
            cfg_a.write_text(a.replace('esp_proposals = ["aes128gcm16"]', 'esp_proposals = ["des-md5"]'))
            da.proc.send_signal(signal.SIGHUP)
            nsutil.wait_for(lambda: "reload failed" in da.output(), timeout=10, what=da.output())
            _ping(pair, "10.1.0.1", "10.2.0.1")
            # 3. a changed child proposal: the connection is renegotiated with it
            cfg_a.write_text(a.replace('esp_proposals = ["aes128gcm16"]', 'esp_proposals = ["aes256-sha256"]'))
            da.proc.send_signal(signal.SIGHUP)
            nsutil.wait_for(lambda: "changed=['site']" in da.output(), timeout=10, what=da.output())
            nsutil.wait_for(lambda: "transform=aes256-sha256" in da.output(), timeout=20, what=da.output())
            _ping(pair, "10.1.0.1", "10.2.0.1")
        finally:
            codes = [d.terminate() for d in (da, db)]
        assert codes == [0, 0], da.output()
