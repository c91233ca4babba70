"""The TOML configuration: ``[agent]`` and manually keyed ``[manual.<name>]`` connections.

Shaped like strongSwan's swanctl.conf so its users feel at home (``local_addrs``, ``remote_addrs``,
``local_ts``, ``remote_ts``, ``mode``, ``replay_window``), with the manual-keying fields of
``ip xfrm state``: ``spi_in``/``spi_out`` and ``key_in``/``key_out`` (hex, or ``*_file`` / ``*_env``).
Every error names the key path, the value and the fix; secrets are never echoed.

Theory of operation: ``parse()`` turns TOML text into validated dataclasses without touching the
system (file and environment lookups for secrets go through the ``read_file`` / ``env`` callables it
is given; ``[agent] user`` is looked up in the user database); ``build_datapath()`` turns them into SAs
and SPD policies.
"""

from __future__ import annotations

import ipaddress
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ipsecstack.datapath import Datapath
from ipsecstack.errors import ConfigError
from ipsecstack.ike.session import PeerConfig
from ipsecstack.sa import Lifetime, SecurityAssociation
from ipsecstack.spd import Action, Policy, Selector, Template

INNER_BACKENDS = ("tun", "nfqueue", "memory")
OUTER_BACKENDS = ("raw", "udp", "nfqueue", "memory")

_AGENT_KEYS = {
    "inner_backend", "outer_backend", "tun_name", "tun_mtu", "nfqueue_out", "nfqueue_in", "queue_bypass",
    "log_format", "log_level", "batch_size", "encap_port", "mss_clamp", "tun_addrs", "retransmit_timeout",
    "retransmit_base", "retransmit_tries", "control_socket", "metrics", "user",
}  # fmt: skip
_MANUAL_KEYS = {
    "mode", "protocol", "transform", "local_addrs", "remote_addrs", "local_ts", "remote_ts", "spi_in", "spi_out",
    "key_in", "key_out", "key_in_file", "key_out_file", "key_in_env", "key_out_env", "esn", "replay_window",
    "encap", "encap_port", "tfc_padding", "life_time", "life_bytes", "life_packets",
}  # fmt: skip
_TS_RE = re.compile(r"^(?P<net>[^\[\]]+?)(?:\[(?P<proto>[\w]+)?(?:/(?P<port>[\w\-]+))?\])?$")


@dataclass
class AgentConfig:
    # None until resolved from the children (``resolve_backends``): transport mode -> nfqueue, tunnel -> tun + raw
    inner_backend: str | None = None
    outer_backend: str | None = None
    tun_name: str = "ipsec0"
    tun_mtu: int | None = None
    tun_addrs: list[str] = field(default_factory=list)
    retransmit_timeout: float = 2.0  # IKE: first retransmission after this many seconds (RFC 7296 §2.4)
    retransmit_base: float = 1.8  # ... then back off by this factor
    retransmit_tries: int = 5  # ... and declare the peer dead after this many retransmissions
    control_socket: str = "/run/ipsecstack/ipsecstack.sock"  # the CLI's way in (mode 0600)
    metrics: str | None = None  # "host:port" for the Prometheus endpoint; off unless set
    user: str | None = None  # drop root to this user once everything is open (runtime/privs.py)
    nfqueue_out: int = 10
    nfqueue_in: int = 11
    queue_bypass: bool = False
    log_format: str = "console"
    log_level: str = "info"
    batch_size: int = 64
    encap_port: int = 4500
    mss_clamp: bool = True


@dataclass
class ManualConnection:
    name: str
    mode: Literal["tunnel", "transport"]
    protocol: Literal["esp", "ah"]
    transform: str
    local_addr: str
    remote_addr: str
    local_ts: list[Selector]
    remote_ts: list[Selector]
    spi_in: int
    spi_out: int
    key_in: bytes = field(repr=False)
    key_out: bytes = field(repr=False)
    esn: bool = False
    replay_window: int = 64
    encap: bool = False
    encap_port: int = 4500
    tfc_padding: int = 0
    hard: Lifetime = field(default_factory=Lifetime)


@dataclass
class Config:
    agent: AgentConfig
    manual: list[ManualConnection]
    connections: list[PeerConfig] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    trap: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # keys accepted but not applied yet


def _type(path: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(path, value, f"expected {what}")


def _unknown(path: str, table: Mapping[str, Any], known: set[str]) -> None:
    for k in table:
        if k not in known:
            hint = ", ".join(sorted(known))
            raise ConfigError(f"{path}.{k}", table[k], f"unknown key; known keys here: {hint}")


def parse_duration(value: Any, path: str) -> float:
    """swanctl durations: ``30s``, ``10m``, ``1h``, ``2d`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
        if m:
            return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    raise ConfigError(path, value, "give seconds or a duration like 30s, 10m, 1h, 2d")


def parse_size(value: Any, path: str) -> int:
    """Byte/packet counts with optional ``k``/``M``/``G`` suffix (powers of 1024, as swanctl)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", value)
        if m:
            return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    raise ConfigError(path, value, "give a count like 1000, 500k, 2M or 1G")


def parse_ts(text: Any, path: str) -> Selector:
    """A traffic selector in swanctl syntax: ``10.0.0.0/8``, ``192.0.2.1[tcp/80]``, ``::/0[udp]``."""
    if not isinstance(text, str):
        raise ConfigError(path, text, "give a CIDR string, optionally with [proto/port], e.g. 10.1.0.0/16[tcp/443]")
    m = _TS_RE.match(text.strip())
    if m is None:
        raise ConfigError(path, text, "give a CIDR string, optionally with [proto/port], e.g. 10.1.0.0/16[tcp/443]")
    net = m.group("net").strip()
    if net == "dynamic":
        raise ConfigError(path, text, "'dynamic' needs IKE; manual connections take explicit subnets")
    port: int | tuple[int, int] | None = None
    if m.group("port"):
        p = m.group("port")
        try:
            port = (int(p.split("-")[0]), int(p.split("-")[1])) if "-" in p else int(p)
        except ValueError:
            raise ConfigError(path, text, "ports are numbers or ranges like 1024-65535") from None
    try:
        return Selector(None, net, m.group("proto"), None, port)
    except ConfigError as e:
        raise ConfigError(path, text, e.fix) from None


def _addr(value: Any, path: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    _type(path, value, str, "one IP address as a string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(path, value, "give one IPv4 or IPv6 address, e.g. 192.0.2.1") from None


def _key(
    table: Mapping[str, Any], name: str, path: str, read_file: Callable[[str], str], env: Mapping[str, str]
) -> bytes:
    sources = [k for k in (name, f"{name}_file", f"{name}_env") if k in table]
    if len(sources) != 1:
        raise ConfigError(f"{path}.{name}", "<missing>" if not sources else "<several>",
                          f"give exactly one of {name} (hex), {name}_file or {name}_env")  # fmt: skip
    src = sources[0]
    raw = table[src]
    _type(f"{path}.{src}", "<secret>" if isinstance(raw, str) else raw, str, "a string")
    if src.endswith("_file"):
        try:
            raw = read_file(raw)
        except OSError as e:
            raise ConfigError(f"{path}.{src}", raw, f"cannot read the key file: {e.strerror}") from None
    elif src.endswith("_env"):
        if raw not in env:
            raise ConfigError(f"{path}.{src}", raw, "that environment variable is not set")
        raw = env[raw]
    hexstr = raw.strip().replace(":", "").replace(" ", "").removeprefix("0x")
    try:
        return bytes.fromhex(hexstr)
    except ValueError:
        raise ConfigError(f"{path}.{src}", "<secret>", "keys are hex strings (colons and spaces allowed)") from None


def _user(path: str, name: Any) -> None:
    """``[agent] user``: an existing account other than root (the daemon starts as root and drops to it)."""
    _type(path, name, str, 'a user name, e.g. "nobody"')
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        fix = "no such user on this system: create it (useradd --system --shell /usr/sbin/nologin ipsecstack)"
        raise ConfigError(path, name, f"{fix} or name an existing one, e.g. nobody") from None
    if uid == 0:
        raise ConfigError(path, name, "the daemon starts as root already: remove agent.user or name another user")


def _agent(table: Mapping[str, Any]) -> AgentConfig:
    _unknown("agent", table, _AGENT_KEYS)
    a = AgentConfig()
    for k, v in table.items():
        path = f"agent.{k}"
        if k == "metrics":
            _type(path, v, str, 'a listen address, e.g. "127.0.0.1:9505"')
            _host, sep, port = v.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(path, v, 'give host:port, e.g. "127.0.0.1:9505" or "[::1]:9505"')
        elif k == "user":
            _user(path, v)
        elif k in ("inner_backend", "outer_backend", "tun_name", "log_format", "log_level", "control_socket"):
            _type(path, v, str, "a string")
        elif k in ("queue_bypass", "mss_clamp"):
            _type(path, v, bool, "true or false")
        elif k in ("retransmit_timeout", "retransmit_base"):
            _type(path, v, (int, float), "a number of seconds / a factor")
            if v <= 0 or (k == "retransmit_base" and v < 1):
                raise ConfigError(path, v, "must be positive (and the base at least 1)")
            setattr(a, k, float(v))
            continue
        elif k == "tun_addrs":
            _type(path, v, list, "a list of addresses with prefix length, e.g. ['10.1.0.1/16']")
            for i, x in enumerate(v):
                try:
                    ipaddress.ip_interface(x)
                except (ValueError, TypeError):
                    raise ConfigError(
                        f"{path}[{i}]", x, "give an address with prefix length, e.g. 10.1.0.1/16"
                    ) from None
        else:
            _type(path, v, int, "an integer")
        setattr(a, k, v)
    for key, value, known in (("inner", a.inner_backend, INNER_BACKENDS), ("outer", a.outer_backend, OUTER_BACKENDS)):
        if value is not None and value not in known:
            fix = f"use one of {', '.join(known)}, or leave it out: it follows from the children"
            raise ConfigError(f"agent.{key}_backend", value, fix)
    if a.log_format not in ("console", "json"):
        raise ConfigError("agent.log_format", a.log_format, "use console or json")
    if not 1 <= a.batch_size <= 4096:
        raise ConfigError("agent.batch_size", a.batch_size, "use 1..4096 (default 64)")
    return a


def _manual(
    name: str, t: Mapping[str, Any], read_file: Callable[[str], str], env: Mapping[str, str]
) -> ManualConnection:
    path = f"manual.{name}"
    _unknown(path, t, _MANUAL_KEYS)
    mode = t.get("mode", "tunnel")
    if mode not in ("tunnel", "transport"):
        raise ConfigError(f"{path}.mode", mode, "use tunnel or transport")
    protocol = t.get("protocol", "esp")
    if protocol not in ("esp", "ah"):
        raise ConfigError(f"{path}.protocol", protocol, "use esp or ah")
    for req in ("local_addrs", "remote_addrs", "spi_in", "spi_out"):
        if req not in t:
            raise ConfigError(f"{path}.{req}", "<missing>", "this key is required for a manual connection")
    local = _addr(t["local_addrs"], f"{path}.local_addrs")
    remote = _addr(t["remote_addrs"], f"{path}.remote_addrs")
    default_ts = {"local_ts": [local], "remote_ts": [remote]}
    ts: dict[str, list[Selector]] = {}
    for k in ("local_ts", "remote_ts"):
        raw = t.get(k, default_ts[k] if mode == "transport" else None)
        if raw is None:
            raise ConfigError(
                f"{path}.{k}", "<missing>", "tunnel mode needs the subnets it carries, e.g. ['10.1.0.0/16']"
            )
        if isinstance(raw, str):
            raw = [raw]
        _type(f"{path}.{k}", raw, list, "a list of subnets")
        if not raw:
            raise ConfigError(f"{path}.{k}", raw, "give at least one subnet")
        ts[k] = [parse_ts(x, f"{path}.{k}[{i}]") for i, x in enumerate(raw)]
    for k in ("spi_in", "spi_out"):
        _type(f"{path}.{k}", t[k], int, "an integer (TOML accepts hex: 0x1001)")
        if not 256 <= t[k] <= 0xFFFFFFFF:
            raise ConfigError(f"{path}.{k}", t[k], "use 0x100..0xffffffff (0-255 are reserved, RFC 4303 §2.1)")
    transform = t.get("transform", "aes128gcm16" if protocol == "esp" else "sha256")
    _type(f"{path}.transform", transform, str, "a transform keyword, e.g. aes128gcm16")
    for k in ("esn", "encap"):
        if k in t:
            _type(f"{path}.{k}", t[k], bool, "true or false")
    for k in ("replay_window", "encap_port", "tfc_padding"):
        if k in t:
            _type(f"{path}.{k}", t[k], int, "an integer")
    hard = Lifetime(
        seconds=parse_duration(t["life_time"], f"{path}.life_time") if "life_time" in t else None,
        bytes=parse_size(t["life_bytes"], f"{path}.life_bytes") if "life_bytes" in t else None,
        packets=parse_size(t["life_packets"], f"{path}.life_packets") if "life_packets" in t else None,
    )
    conn = ManualConnection(
        name=name, mode=mode, protocol=protocol, transform=transform, local_addr=local, remote_addr=remote,
        local_ts=ts["local_ts"], remote_ts=ts["remote_ts"], spi_in=t["spi_in"], spi_out=t["spi_out"],
        key_in=_key(t, "key_in", path, read_file, env), key_out=_key(t, "key_out", path, read_file, env),
        esn=t.get("esn", False), replay_window=t.get("replay_window", 64), encap=t.get("encap", False),
        encap_port=t.get("encap_port", 4500), tfc_padding=t.get("tfc_padding", 0), hard=hard,
    )  # fmt: skip
    # Build the SAs once now so transform/key/option errors surface with this connection's path.
    try:
        manual_sas(conn)
    except ConfigError as e:
        field_name = {"key": "key_in", "transform": "transform"}.get(e.field, e.field)
        raise ConfigError(f"{path}.{field_name}", e.value, e.fix) from None
    return conn


def load(path: str, env: Mapping[str, str]) -> Config:
    """Read and validate the config file ``path``; files it names are relative to its directory.

    The one place that reads files for the config: :func:`parse` itself only sees callables.
    """
    from pathlib import Path

    base = Path(path).resolve().parent
    text = Path(path).read_text()
    return parse(
        text, read_file=lambda p: (base / p).read_text(), env=env, read_bytes=lambda p: (base / p).read_bytes()
    )


def parse(
    text: str,
    *,
    read_file: Callable[[str], str] | None = None,
    env: Mapping[str, str] | None = None,
    read_bytes: Callable[[str], bytes] | None = None,
) -> Config:
    """Parse and validate a configuration; raises :class:`ConfigError` naming the key path."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("<file>", "<toml>", f"not valid TOML: {e}") from None
    _unknown("<top>", doc, {"agent", "manual", "connections", "secrets", "pools"})
    agent = _agent(doc.get("agent", {}))
    from ipsecstack.ike.pools import Pool

    pools: dict[str, Pool] = {}
    for pname, pt in doc.get("pools", {}).items():
        ppath = f"pools.{pname}"
        if not isinstance(pt, dict):
            raise ConfigError(ppath, pt, 'each pool is a table: addrs = "10.9.0.0/24", dns = ["10.1.0.53"]')
        _unknown(ppath, pt, {"addrs", "dns"})
        if not isinstance(pt.get("addrs"), str):
            raise ConfigError(f"{ppath}.addrs", pt.get("addrs"), 'give a prefix or range, e.g. "10.9.0.0/24"')
        dns = pt.get("dns", [])
        _type(f"{ppath}.dns", dns, list, "a list of resolver addresses")
        pools[pname] = Pool.parse(pname, pt["addrs"], dns, ppath)

    def no_files(p: str) -> str:
        raise OSError(2, "file access not provided")

    manual = [
        _manual(name, t, read_file or no_files, env if env is not None else {})
        for name, t in doc.get("manual", {}).items()
    ]
    from ipsecstack.connections import parse_connections

    ike = parse_connections(doc, read_file or no_files, env if env is not None else {}, pools, read_bytes)
    resolve_backends(agent, manual, ike.peers)
    for peer in ike.peers:
        ah = next((ch.name for ch in peer.children if ch.protocol == "ah"), None)
        if ah is not None and agent.outer_backend == "udp":
            # the udp backend sends everything as ESP in UDP (runtime/agent.py forces encap); AH needs raw IP
            raise ConfigError("agent.outer_backend", "udp", f"connections.{peer.name}.children.{ah}.ah_proposals "
                              "needs IP protocol 51, which the udp backend cannot carry (ESP in UDP only, RFC 3948): "
                              'use outer_backend = "raw" (tunnel mode) or nfqueue (transport mode)')  # fmt: skip
        peer.retransmit_timeout = agent.retransmit_timeout
        peer.retransmit_base = agent.retransmit_base
        peer.retransmit_tries = agent.retransmit_tries
    if not manual and not ike.peers:
        raise ConfigError("connections", "<missing>", "define a [connections.<name>] or a [manual.<name>] connection")
    return Config(agent, manual, ike.peers, ike.start, ike.trap, ike.notices)


def _modes(manual: list[ManualConnection], peers: list[PeerConfig]) -> dict[str, list[str]]:
    """Key paths of every connection/child by mode."""
    out: dict[str, list[str]] = {"tunnel": [], "transport": []}
    for c in manual:
        out[c.mode].append(f"manual.{c.name}")
    for peer in peers:
        for child in peer.children:
            out[child.mode].append(f"connections.{peer.name}.children.{child.name}")
    return out


def resolve_backends(a: AgentConfig, manual: list[ManualConnection], peers: list[PeerConfig]) -> None:
    """Pick the packet I/O backends the children need, or refuse a choice that cannot carry them.

    Protection that is reported but not applied must be impossible (RFC 4301 §4.4.1: traffic a PROTECT
    policy covers is protected or dropped). A TUN device only sees packets routed into it, i.e. tunnel
    mode traffic to remote subnets; the host's own traffic to a peer (transport mode) never enters it,
    so transport mode needs NFQUEUE, which queues exactly that traffic and also carries the protected
    side (inner and outer in one). So: all children in transport mode -> ``nfqueue``/``nfqueue``; all
    in tunnel mode -> ``tun`` + ``raw`` (raw ESP/AH plus the UDP encapsulation socket for NAT
    traversal, per SA); both in one file -> an error (one daemon runs one inner plane; run two).
    """
    modes = _modes(manual, peers)
    if "nfqueue" in (a.inner_backend, a.outer_backend) and None in (a.inner_backend, a.outer_backend):
        a.inner_backend = a.outer_backend = "nfqueue"  # NFQUEUE is both planes
    if a.inner_backend is None and a.outer_backend is None:
        if modes["tunnel"] and modes["transport"]:
            raise ConfigError("agent.inner_backend", "<missing>",
                              f"tunnel-mode ({', '.join(modes['tunnel'])}) and transport-mode "
                              f"({', '.join(modes['transport'])}) children in one file: one daemon carries one "
                              "kind (TUN for tunnel mode, NFQUEUE for transport mode); split them into two "
                              "configuration files and run two daemons")  # fmt: skip
        a.inner_backend, a.outer_backend = ("nfqueue", "nfqueue") if modes["transport"] else ("tun", "raw")
    if a.inner_backend is None:
        a.inner_backend = "tun" if a.outer_backend in ("raw", "udp") else a.outer_backend
    if a.outer_backend is None:
        a.outer_backend = "raw" if a.inner_backend == "tun" else a.inner_backend
    if (a.inner_backend == "nfqueue") != (a.outer_backend == "nfqueue"):
        raise ConfigError("agent.outer_backend", a.outer_backend,
                          f"NFQUEUE is both planes: with inner_backend = {a.inner_backend!r} use raw or udp, "
                          "or set both to nfqueue (or leave both out: they follow from the children)")  # fmt: skip
    why = "leave agent.inner_backend and agent.outer_backend out: they follow from the children"
    if a.inner_backend == "tun" and modes["transport"]:
        raise ConfigError("agent.inner_backend", "tun",
                          f"{modes['transport'][0]} is transport mode: it protects this host's own traffic to "
                          "the peer, which never enters a TUN device, so it would flow in clear; use nfqueue, "
                          f"or {why}")  # fmt: skip
    if a.inner_backend == "nfqueue" and modes["tunnel"]:
        raise ConfigError("agent.inner_backend", "nfqueue",
                          f"{modes['tunnel'][0]} is tunnel mode: NFQUEUE protects this host's own traffic "
                          "(transport mode) only; tunnel mode routes the subnets into a TUN device: use tun, "
                          f"or {why}")  # fmt: skip


def manual_sas(c: ManualConnection) -> tuple[SecurityAssociation, SecurityAssociation]:
    """The (outbound, inbound) SA pair of a manual connection."""
    encap = (c.encap_port, c.encap_port) if c.encap else None
    common: dict[str, Any] = dict(
        esn=c.esn, replay_window=c.replay_window, udp_encap=encap, hard=c.hard, name=c.name,
    )  # fmt: skip
    out = SecurityAssociation(
        c.spi_out, c.protocol, c.mode, c.transform, c.key_out, direction="out",
        tunnel_src=c.local_addr, tunnel_dst=c.remote_addr, tfc_padding=c.tfc_padding, **common,
    )  # fmt: skip
    inb = SecurityAssociation(
        c.spi_in, c.protocol, c.mode, c.transform, c.key_in, direction="in",
        tunnel_src=c.remote_addr, tunnel_dst=c.local_addr, **common,
    )  # fmt: skip
    return out, inb


def manual_policies(c: ManualConnection) -> list[Policy]:
    """SPD entries for a manual connection: PROTECT local_ts -> remote_ts out, the mirror in."""
    out: list[Policy] = []
    t_out = Template(c.protocol, c.mode, spi=c.spi_out, tunnel_src=c.local_addr, tunnel_dst=c.remote_addr)
    t_in = Template(c.protocol, c.mode, spi=c.spi_in, tunnel_src=c.remote_addr, tunnel_dst=c.local_addr)
    for lt in c.local_ts:
        for rt in c.remote_ts:
            if (lt.dst and rt.dst) and lt.dst.version != rt.dst.version:
                continue
            sel = Selector(
                str(lt.dst) if lt.dst else None, str(rt.dst) if rt.dst else None,
                rt.proto or lt.proto, lt.dport, rt.dport,
            )  # fmt: skip
            out.append(Policy(sel, Action.PROTECT, "out", t_out, name=c.name))
            out.append(Policy(sel.reversed(), Action.PROTECT, "in", t_in, name=c.name))
    return out


def build_datapath(cfg: Config, now: float) -> Datapath:
    """A Datapath with every manual connection's SAs installed and policies added."""
    dp = Datapath(encap_ports={c.encap_port for c in cfg.manual if c.encap} or {cfg.agent.encap_port})
    for c in cfg.manual:
        for sa in manual_sas(c):
            dp.install(sa, now)
        for pol in manual_policies(c):
            dp.spd.add(pol)
    return dp
