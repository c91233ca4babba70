"""Backends that cannot start say what is missing: BackendError messages, checked against the real kernel.

Anything that needs a particular network state runs as a small Python program inside a fresh
namespace (``nsutil.netns_pair``), so nothing on the host is touched. Without root every test here
skips with the reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from backends.tun import TunPort
from ipsecstack.runtime.io import BackendError
from tests.netns import nsutil

pytestmark = [pytest.mark.root]

# Runs inside a namespace: build one port from the expression in argv[1], optionally after dropping
# root (argv[2] == "nobody"), and print {"error": message} or {"ok": repr} as JSON.
PROBE = """
import json, os, sys
from backends.rawsock import RawPort
from backends.tun import TunPort
from backends.udp import UdpEncapPort
from ipsecstack.runtime.io import BackendError

# backend errors come before any engine runs
DATAPATH_ENGINES = ("default",)
if sys.argv[2] == "nobody":
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
ports = []
try:
    for expr in sys.argv[1].split(";"):
        ports.append(eval(expr))
except BackendError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"ok": repr(ports[-1])}))
finally:
    for p in ports:
        p.close()
"""


def _probe(ns: nsutil.Netns, expr: str, user: str = "root") -> dict[str, str]:
    r = ns.run("env", f"PYTHONPATH={nsutil.REPO}", sys.executable, "-c", PROBE, expr, user, check=False, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    result: dict[str, str] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return result


def _foreign(pair: nsutil.Pair) -> tuple[str, str]:
    """Addresses in the namespaces' subnets that no interface has."""
    return pair.addr_a.rsplit(".", 1)[0] + ".99", pair.addr6_a.rsplit(":", 1)[0] + ":99"


def test_tun_missing_clone_device(tmp_path: Path) -> None:
    nsutil.need_root()
    with pytest.raises(BackendError, match=r"modprobe tun") as e:
        TunPort("ipsx0", mtu=1400, dev_path=str(tmp_path / "no-such-tun"))
    assert str(tmp_path / "no-such-tun") in str(e.value)


def test_tun_name_in_use_and_cleanup_after_failure() -> None:
    with nsutil.netns_pair("te") as pair:
        r = _probe(pair.a, "TunPort('eth0', mtu=1400)")
        assert "'eth0'" in r["error"] and "in use" in r["error"], r
        r = _probe(pair.a, "TunPort('ipsx0', mtu=1400);TunPort('ipsx0', mtu=1400)")
        assert "in use" in r["error"], r
        # a route that cannot be added: the port removes what it had done, and the device goes with it
        r = _probe(pair.a, "TunPort('ipsx1', mtu=1400, routes=['10.9.0.0/16']);TunPort('ipsx2', mtu=1400, "
                           "addresses=['10.8.0.1/16'], routes=['10.9.0.0/16'])")  # fmt: skip
        assert "ipsx2" in r["error"] and "10.9.0.0/16" in r["error"] and "already exists" in r["error"], r
        links = pair.a.run("ip", "-o", "link").stdout.decode()
        assert "ipsx" not in links, links
        assert "10.8." not in pair.a.run("ip", "-o", "addr").stdout.decode()


def test_tun_without_privilege_names_cap_net_admin() -> None:
    with nsutil.netns_pair("te") as pair:
        r = _probe(pair.a, "TunPort('ipsx0', mtu=1400)", user="nobody")
        assert "CAP_NET_ADMIN" in r["error"] and "root" in r["error"], r


def test_raw_without_privilege_names_cap_net_raw() -> None:
    with nsutil.netns_pair("te") as pair:
        r = _probe(pair.a, f"RawPort(4, local={pair.addr_a!r})", user="nobody")
        assert "CAP_NET_RAW" in r["error"] and "root" in r["error"], r


@pytest.mark.parametrize("version", [4, 6])
def test_raw_bind_to_foreign_address(version: int) -> None:
    with nsutil.netns_pair("te") as pair:
        foreign = _foreign(pair)[version == 6]
        r = _probe(pair.a, f"RawPort({version}, local={foreign!r})")
        assert foreign in r["error"] and "not on this machine" in r["error"], r
        mine = pair.addr_a if version == 4 else pair.addr6_a
        assert "ok" in _probe(pair.a, f"RawPort({version}, local={mine!r})")
        r = _probe(pair.a, f"RawPort({version}, local={(pair.addr6_a if version == 4 else pair.addr_a)!r})")
        assert f"not IPv{version}" in r["error"], r


@pytest.mark.parametrize("version", [4, 6])
def test_udp_bind_to_foreign_address_and_port_in_use(version: int) -> None:
    with nsutil.netns_pair("te") as pair:
        foreign = _foreign(pair)[version == 6]
        r = _probe(pair.a, f"UdpEncapPort({foreign!r}, 4500)")
        assert foreign in r["error"] and "not on this machine" in r["error"], r
        mine = pair.addr_a if version == 4 else pair.addr6_a
        assert "ok" in _probe(pair.a, f"UdpEncapPort({mine!r}, 4500)")
        r = _probe(pair.a, f"UdpEncapPort({mine!r}, 4500);UdpEncapPort({mine!r}, 4500)")
        assert "in use" in r["error"] and "encap_port" in r["error"], r


def test_daemon_reports_backend_error_and_removes_tun(tmp_path: Path) -> None:
    """``ipsecstack run`` with a local address the machine lacks: exit 3, the message, no TUN left behind."""
    with nsutil.netns_pair("te") as pair:
        foreign = _foreign(pair)[0]
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f"""
[agent]
inner_backend = "tun"
outer_backend = "raw"
tun_name = "ipsx0"
tun_addrs = ["10.1.0.1/16"]

[manual.site]
local_addrs = "{foreign}"
remote_addrs = "{pair.addr_b}"
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
spi_in = 0x2001
spi_out = 0x1001
key_in = "{"11" * 20}"
key_out = "{"22" * 20}"
""")
        p = pair.a.ipsecstack("run", "-c", str(cfg))
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 3, err.decode()
        assert f"ipsecstack: cannot bind the raw IPv4 ESP socket to {foreign}" in err.decode()
        assert "ipsx0" not in pair.a.run("ip", "-o", "link").stdout.decode()
