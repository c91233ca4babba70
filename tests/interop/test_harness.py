"""The strongSwan harness works: two charons in two namespaces bring up an IKEv2/ESP tunnel.

A (namespace ``a``) initiates to B (namespace ``b``) with PSK auth, IKE aes128gcm16-prfsha256-x25519
and ESP aes128gcm16. Two layouts:

* ``host``: host-to-host, the traffic selectors are the veth addresses themselves (/32), so the ping
  goes to the very address IKE runs on. This is the case that needs ``allow_peer_ts`` and the fwmark
  pair (see strongswan.py), and it is the simplest shape to reproduce against ipsecstack.
* ``subnet``: site-to-site, 10.1.0.1/16 on a stand-in LAN interface in A and 10.2.0.1/16 in B, selectors
  10.1.0.0/16 === 10.2.0.0/16 (the layout of tests/netns/test_tunnel.py).

Each test checks that both sides report the IKE SA ESTABLISHED and the child SA INSTALLED (strongSwan's
word for an established child SA) with matching SPIs, pings through the tunnel, sees the ESP packet
counters move on both sides, and -- if tcpdump is installed -- that the veth carried ESP-in-UDP on
port 4500 with the child's SPIs and no plaintext ICMP. Finally A terminates and B's SA goes away.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop import strongswan as sw
from tests.netns import nsutil

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

PSK = "interop-harness-psk-0123456789"
IKE = "aes128gcm16-prfsha256-x25519"
ESP = "aes128gcm16"
PINGS = 3


def _require() -> None:
    nsutil.need_root()
    missing = sw.missing_requirements()
    if missing:
        pytest.skip("strongSwan harness needs: " + "; ".join(missing))


@contextlib.contextmanager
def capture(ns: nsutil.Netns, iface: str = "eth0") -> Iterator[list[str]]:
    """tcpdump text lines seen on ``iface`` while the block runs (filled in on exit)."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="swcap-") as d:
        out, err = Path(d) / "out", Path(d) / "err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            cmd = ns.cmd("tcpdump", "-i", iface, "-n", "-l", "-U", "-p", "udp or icmp or esp")
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        try:
            nsutil.wait_for(
                lambda: "listening on" in err.read_text(errors="replace") or proc.poll() is not None,
                timeout=5,
                what="tcpdump to start",
            )
            assert proc.poll() is None, f"tcpdump exited: {err.read_text(errors='replace')}"
            yield lines
            time.sleep(0.2)  # let the last packets reach the capture
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            lines.extend(out.read_text(errors="replace").splitlines())


def _ping(ns: nsutil.Netns, src: str, dst: str, peers: tuple[sw.StrongSwan, ...]) -> None:
    res = ns.run("ping", "-c", str(PINGS), "-i", "0.2", "-W", "2", "-I", src, dst, check=False, timeout=15)
    text = res.stdout.decode(errors="replace")
    m = re.search(r"(\d+) received", text)
    if res.returncode != 0 or m is None or int(m.group(1)) != PINGS:
        logs = "\n".join(f"--- {p.ns.name} ---\n{p.log_tail(30)}" for p in peers)
        raise AssertionError(f"ping {src} -> {dst} through the tunnel failed:\n{text}{res.stderr.decode()}\n{logs}")


@pytest.mark.parametrize("layout", ["host", "subnet"])
def test_two_strongswans_tunnel(layout: str) -> None:
    _require()
    t0 = time.monotonic()
    with nsutil.netns_pair("sw") as pair, contextlib.ExitStack() as stack:
        if layout == "host":
            ts_a, ts_b = sw.host_prefix(pair.addr_a), sw.host_prefix(pair.addr_b)
            inner_a, inner_b = pair.addr_a, pair.addr_b
        else:
            ts_a, ts_b = "10.1.0.0/16", "10.2.0.0/16"
            inner_a, inner_b = "10.1.0.1", "10.2.0.1"
            for ns, addr in ((pair.a, "10.1.0.1/16"), (pair.b, "10.2.0.1/16")):
                # This kernel has no dummy module: a veth pair inside the namespace stands in for it.
                ns.run("ip", "link", "add", "inner0", "type", "veth", "peer", "name", "inner1")
                ns.run("ip", "addr", "add", addr, "dev", "inner0")
                ns.run("ip", "link", "set", "inner1", "up")
                ns.run("ip", "link", "set", "inner0", "up")
        common = {"psk": PSK, "ike_proposals": IKE, "esp_proposals": ESP, "conn": "h2h", "child": "h2h"}
        a = stack.enter_context(
            sw.strongswan(pair.a, local=pair.addr_a, remote=pair.addr_b, local_ts=ts_a, remote_ts=ts_b, **common)
        )
        b = stack.enter_context(
            sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, local_ts=ts_b, remote_ts=ts_a, **common)
        )

        a.initiate("h2h")
        ike_a, child_a = a.wait_established(timeout=10)
        ike_b, child_b = b.wait_established(timeout=10)
        assert ike_a.info.get("initiator") == "yes", ike_a.info
        assert ike_a.info["encr-alg"] == "AES_GCM_16" and ike_a.info["dh-group"] == "CURVE_25519", ike_a.info
        assert ike_a.info["prf-alg"] == "PRF_HMAC_SHA2_256", ike_a.info
        for c in (child_a, child_b):
            assert c.info["protocol"] == "ESP" and c.info["mode"] == "TUNNEL", c.info
            assert c.info["encr-alg"] == "AES_GCM_16" and c.info["encr-keysize"] == "128", c.info
            assert c.info.get("encap") == "yes", f"kernel-libipsec always UDP-encapsulates: {c.info}"
        assert child_a.spi_in == child_b.spi_out and child_a.spi_out == child_b.spi_in, (child_a.info, child_b.info)
        assert child_a.info["local-ts"] == [ts_a] and child_a.info["remote-ts"] == [ts_b], child_a.info
        assert ike_a.info["local-port"] == "4500" and ike_b.info["local-port"] == "4500", "no float to 4500"

        cap_ctx = capture(pair.b) if shutil.which("tcpdump") else contextlib.nullcontext([])
        with cap_ctx as lines:
            _ping(pair.a, inner_a, inner_b, (a, b))

        found_a, found_b = a.established(), b.established()
        assert found_a and found_b, "SAs vanished after the ping"
        for side, (_, c) in (("A", found_a), ("B", found_b)):
            assert c.packets_out >= PINGS and c.packets_in >= PINGS, f"{side} ESP counters: {c.info}"
            assert c.bytes_out > 0 and c.bytes_in > 0, f"{side} ESP counters: {c.info}"

        if shutil.which("tcpdump"):
            capture_text = "\n".join(lines)
            esp = [ln for ln in lines if ".4500 > " in ln and "UDP-encap: ESP" in ln]
            spis = {int(s, 16) for s in re.findall(r"ESP\(spi=0x([0-9a-f]+)", capture_text)}
            assert len(esp) >= 2 * PINGS, f"expected >= {2 * PINGS} ESP-in-UDP packets:\n{capture_text}"
            assert {child_a.spi_out, child_b.spi_out} <= spis, f"SPIs {spis} vs child SAs:\n{capture_text}"
            assert "ICMP" not in capture_text, f"plaintext ICMP on the veth:\n{capture_text}"

        a.terminate()
        nsutil.wait_for(lambda: not b.list_sas(), timeout=10, what="B to drop the SA after A's DELETE")
        assert not a.list_sas()
    assert time.monotonic() - t0 < 60
