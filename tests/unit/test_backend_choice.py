"""The packet I/O backends follow from the children; a choice that cannot carry them is a config error.

A transport-mode child protects the host's own traffic, which never enters a TUN device: with TUN it
would be reported installed and flow in clear. So transport mode means NFQUEUE, tunnel mode TUN, and
the outer plane of TUN is raw ESP/AH plus ESP in UDP for the SAs that cross a NAT.
"""

from __future__ import annotations

import pytest

from backends.outer import OuterSet, is_udp
from ipsecstack.agent import force_encap
from ipsecstack.config import parse
from ipsecstack.errors import ConfigError
from tests.packets import udp4

IKE = """
{agent}
[connections.gw]
local_addrs = ["192.0.2.1"]
remote_addrs = ["192.0.2.2"]
local = {{ auth = "psk", id = "a.example" }}
remote = {{ auth = "psk", id = "b.example" }}
{children}
[secrets.ike.gw]
secret = "a long enough secret"
"""

TUNNEL = """
[connections.gw.children.net]
local_ts = ["10.1.0.0/16"]
remote_ts = ["10.2.0.0/16"]
"""

TRANSPORT = """
[connections.gw.children.host]
mode = "transport"
"""

MANUAL_TRANSPORT = """
[manual.h]
mode = "transport"
local_addrs = "192.0.2.1"
remote_addrs = "192.0.2.3"
spi_in = 0x1001
spi_out = 0x1002
key_in = "{k}"
key_out = "{k}"
""".format(k="00" * 20)


def _cfg(children: str, agent: str = "", manual: str = "") -> tuple[str | None, str | None]:
    cfg = parse(IKE.format(agent=agent, children=children) + manual)
    return cfg.agent.inner_backend, cfg.agent.outer_backend


def test_defaults_follow_the_children() -> None:
    assert _cfg(TUNNEL) == ("tun", "raw")
    assert _cfg(TRANSPORT) == ("nfqueue", "nfqueue")
    # a manual transport-mode connection alone, too
    cfg = parse(MANUAL_TRANSPORT)
    assert (cfg.agent.inner_backend, cfg.agent.outer_backend) == ("nfqueue", "nfqueue")


def test_nfqueue_implies_its_outer_side() -> None:
    assert _cfg(TRANSPORT, '[agent]\ninner_backend = "nfqueue"') == ("nfqueue", "nfqueue")
    assert _cfg(TRANSPORT, '[agent]\nouter_backend = "nfqueue"') == ("nfqueue", "nfqueue")
    assert _cfg(TUNNEL, '[agent]\nouter_backend = "udp"') == ("tun", "udp")
    assert _cfg(TUNNEL, '[agent]\ninner_backend = "tun"') == ("tun", "raw")


@pytest.mark.parametrize(
    ("children", "agent", "path", "words"),
    [
        # the security bug: reported installed, sent in clear
        (TRANSPORT, '[agent]\ninner_backend = "tun"', "agent.inner_backend", "flow in clear"),
        (TRANSPORT, '[agent]\nouter_backend = "udp"', "agent.inner_backend", "never enters a TUN device"),
        (TUNNEL, '[agent]\ninner_backend = "nfqueue"', "agent.inner_backend", "tunnel mode"),
        (TUNNEL + TRANSPORT, "", "agent.inner_backend", "two daemons"),
        (TUNNEL, '[agent]\ninner_backend = "tun"\nouter_backend = "nfqueue"', "agent.outer_backend", "both planes"),
        (TUNNEL, '[agent]\ninner_backend = "tap"', "agent.inner_backend", "leave it out"),
    ],
)
def test_backends_that_cannot_carry_the_children(children: str, agent: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(children, agent)
    assert e.value.field == path and words in str(e.value), str(e.value)


def test_mixed_modes_name_both_children() -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(TUNNEL + TRANSPORT)
    assert "connections.gw.children.net" in str(e.value) and "connections.gw.children.host" in str(e.value)


def test_encapsulation_is_forced_only_by_the_udp_outer_plane() -> None:
    for agent, forced in (
        ("", False),
        ('[agent]\nouter_backend = "raw"', False),
        ('[agent]\nouter_backend = "udp"', True),
    ):
        cfg = parse(IKE.format(agent=agent, children=TUNNEL))
        force_encap(cfg)
        assert cfg.connections[0].encap is forced, agent


class _FakePort:
    def __init__(self, name: str, incoming: list[bytes]) -> None:
        self.name = name
        self.mtu = 1500
        self.incoming = incoming
        self.sent: list[bytes] = []
        self.stats = type("S", (), {k: 0 for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                                                  "tx_dropped", "rx_errors")})()  # fmt: skip
        self.port = 4500

    def read_batch(self, limit: int) -> list[bytes]:
        out, self.incoming = self.incoming[:limit], self.incoming[limit:]
        return out

    def write_batch(self, packets: list[bytes]) -> int:
        self.sent += packets
        return len(packets)


def _esp4(dst: str = "192.0.2.2") -> bytes:
    import ipaddress
    import struct

    body = struct.pack("!II", 0x1001, 1) + bytes(32)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 50, 0,
                      ipaddress.ip_address("192.0.2.1").packed, ipaddress.ip_address(dst).packed)  # fmt: skip
    return hdr + body


def test_outer_set_sends_each_sa_its_way_and_reads_both() -> None:
    esp, udp = _esp4(), udp4("192.0.2.1", "192.0.2.2", 4500, 4500, b"\x00\x00\x10\x01" + bytes(40))
    assert is_udp(udp) and not is_udp(esp) and not is_udp(b"\x45")
    raw_port, udp_port = _FakePort("raw", [esp] * 3), _FakePort("udp", [udp] * 3)
    outer = OuterSet(raw_port, udp_port)  # type: ignore[arg-type]
    assert outer.write_batch([esp, udp, esp]) == 3
    assert raw_port.sent == [esp, esp] and udp_port.sent == [udp]
    got = outer.read_batch(4)
    assert got == [udp, udp, udp, esp]  # bounded by the batch; the rest waits for the next call
    assert outer.read_batch(4) == [esp, esp]
