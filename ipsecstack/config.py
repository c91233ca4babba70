"""The TOML configuration: ``[agent]`` and manually keyed ``[manual.<name>]`` connections.

Shaped like strongSwan's swanctl.conf so its users feel at home (``local_addrs``, ``remote_addrs``,
``local_ts``, ``remote_ts``, ``mode``, ``replay_window``), with the manual-keying fields of
``ip xfrm state``: ``spi_in``/``spi_out`` and ``key_in``/``key_out`` (hex, or ``*_file`` / ``*_env``).
Every error names the key path, the value and the fix; secrets are never echoed.

Theory of operation: ``parse()`` turns TOML text into validated dataclasses without touching the
system (file and environment lookups for secrets go through the ``read_file`` / ``env`` callables it
is given; ``[agent] user`` is looked up in the user database); ``build_datapath()`` turns them into SAs
and SPD policies. Two layers read the document: the schema (``config_schema``: types, enumerations,
ranges, known keys; strict, nothing coerced) and then the meaning checks here and in
``connections.py``, ``pki.py``, ``ike/``, which run only on the tables the schema accepted and whose
types they may therefore trust. Every error of both layers is collected, in file order, and raised
together (:class:`ConfigErrors`; one alone is a plain :class:`ConfigError`); warnings (a short PSK)
come back in ``Config.warnings``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import re
import tomllib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ipsecstack.config_values import parse_duration, parse_size, parse_ts
from ipsecstack.datapath import Datapath
from ipsecstack.errors import ConfigError, ConfigErrors, ConfigWarning, ErrorCollector
from ipsecstack.ike.session import PeerConfig
from ipsecstack.sa import Lifetime, SecurityAssociation
from ipsecstack.spd import Action, Policy, Selector, Template

if TYPE_CHECKING:
    from ipsecstack.connections import IkeSettings

INNER_BACKENDS = ("tun", "nfqueue", "memory")
OUTER_BACKENDS = ("raw", "udp", "nfqueue", "memory")


@dataclass
class AgentConfig:
    # None until resolved from the children (``resolve_backends``): transport mode -> nfqueue, tunnel -> tun + raw
    inner_backend: str | None = None
    outer_backend: str | None = None
    # the ESP engine: "native" (the C engine) or "python"; None until resolved (``resolve_datapath``):
    # native where it was built, else python
    datapath: str | None = None
    # the datapath's offloads, either engine: TUN TSO (vnet header) with coalescing, UDP GSO and GRO;
    # with NFQUEUE (native engine), in-order inbound TCP segments accepted as one packet
    offloads: bool = True
    # CoDel (RFC 8289) on the native engine's ESP receive queues: the delay a datagram may wait before
    # drops start, and the window it must stay above that for (0 ms: off)
    codel_target_ms: float = 5.0
    codel_interval_ms: float = 100.0
    tun_name: str = "ipsec0"
    tun_mtu: int | None = None
    tun_addrs: list[str] = field(default_factory=list)
    tun_txqueuelen: int | None = None  # the TUN's ring in packets, fixed; None: sized to tun_queue_kb
    tun_queue_kb: int = 1024  # the TUN's ring kept near this many KiB (backends/tun_queue.py); 0: the kernel's 500
    retransmit_timeout: float = 2.0  # IKE: first retransmission after this many seconds (RFC 7296 §2.4)
    retransmit_base: float = 1.8  # ... then back off by this factor
    retransmit_tries: int = 5  # ... and declare the peer dead after this many retransmissions
    control_socket: str = "/run/ipsecstack/ipsecstack.sock"  # the CLI's way in (mode 0600)
    metrics: str | None = None  # "host:port" for the Prometheus endpoint; off unless set
    user: str | None = None  # drop root to this user once everything is open (runtime/privs.py)
    nfqueue_out: int = 10
    nfqueue_in: int = 11
    nfqueue_tcp: int = 12  # the native engine's TCP queue (NFQA_CFG_F_GSO), with offloads on
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
    warnings: list[ConfigWarning] = field(default_factory=list)  # valid but unwise (a short PSK)


def _type(path: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(path, value, f"expected {what}")


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
    except (KeyError, ValueError):  # ValueError: a NUL character in the name
        fix = "no such user on this system: create it (useradd --system --shell /usr/sbin/nologin ipsecstack)"
        raise ConfigError(path, name, f"{fix} or name an existing one, e.g. nobody") from None
    if uid == 0:
        raise ConfigError(path, name, "the daemon starts as root already: remove agent.user or name another user")


def _agent(table: Mapping[str, Any]) -> AgentConfig:
    """``[agent]``, its types, enumerations and ranges checked by the schema: the meaning checks."""
    a = AgentConfig()
    for k, v in table.items():
        path = f"agent.{k}"
        if k == "metrics":
            _host, sep, port = v.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(path, v, 'give host:port, e.g. "127.0.0.1:9505" or "[::1]:9505"')
        elif k == "user":
            _user(path, v)
        elif k == "datapath" and v == "native":
            from ipsecstack import native

            if not native.available:
                raise ConfigError(path, v, f'{native.why_not}; or use datapath = "python"')
        elif k == "tun_addrs":
            for i, x in enumerate(v):
                try:
                    ipaddress.ip_interface(x)
                except ValueError:
                    raise ConfigError(
                        f"{path}[{i}]", x, "give an address with prefix length, e.g. 10.1.0.1/16"
                    ) from None
        setattr(a, k, float(v) if k in _FLOAT_KEYS else v)
    if a.codel_target_ms >= a.codel_interval_ms:
        raise ConfigError("agent.codel_target_ms", a.codel_target_ms,
                          f"give less than agent.codel_interval_ms ({a.codel_interval_ms:g}): RFC 8289 suggests "
                          "5-10 % of it, or 0 to turn CoDel off")  # fmt: skip
    return a


_FLOAT_KEYS = ("retransmit_timeout", "retransmit_base", "codel_target_ms", "codel_interval_ms")


def _manual(
    name: str, t: Mapping[str, Any], read_file: Callable[[str], str], env: Mapping[str, str]
) -> ManualConnection:
    path = f"manual.{name}"  # types, enumerations, ranges and required keys: checked by the schema
    mode = t.get("mode", "tunnel")
    protocol = t.get("protocol", "esp")
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
        if not raw:
            raise ConfigError(f"{path}.{k}", raw, "give at least one subnet")
        ts[k] = [parse_ts(x, f"{path}.{k}[{i}]") for i, x in enumerate(raw)]
    transform = t.get("transform", "aes128gcm16" if protocol == "esp" else "sha256")
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
    local_v, remote_v = _families(conn.local_ts), _families(conn.remote_ts)
    if not local_v & remote_v:  # manual_policies() would install no policy at all
        raise ConfigError(f"{path}.remote_ts", t.get("remote_ts", [remote]), f"local_ts is IPv{min(local_v)} only "
                          f"and remote_ts IPv{min(remote_v)} only: no packet can match both; give subnets of one "
                          "family on both sides")  # fmt: skip
    return conn


def _families(selectors: list[Selector]) -> set[int]:
    """IP versions a list of selectors covers (a selector without an address covers both)."""
    out: set[int] = set()
    for sel in selectors:
        out |= {sel.dst.version} if sel.dst is not None else {4, 6}
    return out


def load(path: str, env: Mapping[str, str]) -> Config:
    """Read and validate the config file ``path``; files it names are relative to its directory.

    The one place that reads files for the config: :func:`parse` itself only sees callables.
    Raises OSError when ``path`` cannot be read, ConfigError for everything else.
    """
    from pathlib import Path

    base = Path(path).resolve().parent
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", f"byte 0x{raw[e.start]:02x} at offset {e.start}", "not UTF-8 text; TOML files "
                          "are UTF-8 (convert it, e.g. iconv -f latin1 -t utf-8)") from None  # fmt: skip

    def read_bytes(name: str) -> bytes:
        try:
            return (base / name).read_bytes()
        except ValueError:  # a NUL character in the name
            raise OSError(errno.EINVAL, "not a valid file name") from None

    def read_file(name: str) -> str:
        try:
            return read_bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise OSError(errno.EILSEQ, "not UTF-8 text") from None

    return parse(text, read_file=read_file, env=env, read_bytes=read_bytes)


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("<file>", "<toml>", f"not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError("<file>", "<toml>", "not valid TOML here: arrays or tables nested too deeply") from None


def _in_file_order(doc: Mapping[str, Any], errors: list[ConfigError]) -> list[ConfigError]:
    """``errors`` sorted by where their key is in the file (a missing key: where its table is), duplicates once."""
    from ipsecstack.config_schema import path_text

    where: dict[str, int] = {}
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), doc)]
    while stack:  # depth first, in file order, without recursion (arrays may be nested deeply)
        loc, node = stack.pop()
        where.setdefault(path_text(loc), len(where))
        items: list[tuple[str | int, Any]] = []
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        stack.extend(((*loc, k), v) for k, v in reversed(items))

    def position(key: str) -> int:
        while key not in where and key:
            key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return where.get(key, len(where))

    unique = {(e.field, repr(e.value), e.fix): e for e in reversed(errors)}  # the first of each, below
    return sorted(reversed(unique.values()), key=lambda e: position(e.field))


def parse(
    text: str,
    *,
    read_file: Callable[[str], str] | None = None,
    env: Mapping[str, str] | None = None,
    read_bytes: Callable[[str], bytes] | None = None,
) -> Config:
    """Parse and validate a configuration; raises :class:`ConfigError` naming the key path.

    Every error in the file is reported: several at once as :class:`ConfigErrors` (``.errors``).
    """
    doc = _toml(text)

    def no_files(p: str) -> str:
        raise OSError(2, "file access not provided")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg, errors = _validate(doc, read_file or no_files, env if env is not None else {}, read_bytes)
    for w in caught:
        if not isinstance(w.message, ConfigWarning):  # not ours: pass it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if errors:
        raise ConfigErrors.of(_in_file_order(doc, errors))
    cfg.warnings = [w.message for w in caught if isinstance(w.message, ConfigWarning)]
    return cfg


def _names(value: Any) -> list[str]:
    """A list of strings or one comma-separated string (swanctl's lists), as ``connections._list`` reads it."""
    return [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)


def _validate(
    doc: Mapping[str, Any], read_file: Callable[[str], str], env: Mapping[str, str],
    read_bytes: Callable[[str], bytes] | None,
) -> tuple[Config, list[ConfigError]]:  # fmt: skip
    """The schema first; then the meaning checks of every table it accepted, each on its own."""
    from ipsecstack.config_schema import check
    from ipsecstack.connections import IkeSettings
    from ipsecstack.ike.pools import Pool

    shape = check(doc)
    errors = ErrorCollector()
    errors.found += [e for _loc, e in shape]

    def clean(*prefix: str) -> bool:
        """No schema error in this table (so its meaning checks may trust its types)."""
        return not any(loc[: len(prefix)] == prefix for loc, _e in shape)

    def table(*prefix: str) -> bool:
        """This is a table (its entries may be looked at one by one)."""
        return not any(loc == prefix for loc, _e in shape)

    agent = errors.run(_agent, doc.get("agent", {})) if clean("agent") else None
    pools: dict[str, Pool] = {}
    if table("pools"):
        for pname, pt in doc.get("pools", {}).items():
            if clean("pools", pname):
                pool = errors.run(Pool.parse, pname, pt["addrs"], pt.get("dns", []), f"pools.{pname}")
                if pool is not None:
                    pools[pname] = pool
    manual: list[ManualConnection] = []
    if table("manual"):
        for name, t in doc.get("manual", {}).items():
            if clean("manual", name):
                conn = errors.run(_manual, name, t, read_file, env)
                if conn is not None:
                    manual.append(conn)
    ike = IkeSettings([], [], [])
    if table("connections"):
        ike = errors.run(_ike, doc, clean, table, pools, read_file, env, read_bytes) or ike
    if agent is not None:
        errors.run(_cross_checks, agent, manual, ike.peers)
    if not manual and not ike.peers and not errors.found:
        errors.found.append(ConfigError("connections", "<missing>",
                                        "define a [connections.<name>] or a [manual.<name>] connection"))  # fmt: skip
    return Config(agent or AgentConfig(), manual, ike.peers, ike.start, ike.trap, ike.notices), errors.found


_SECRET_SECTIONS = ("ike", "private", "rsa", "ecdsa", "pkcs8")


def _stand_in(entry: Any, id_ok: bool) -> dict[str, Any]:
    """For a [secrets.ike.<name>] in error: a table with its ids (if they are right) and a placeholder PSK."""
    from ipsecstack.connections import MIN_PSK

    ids = {"id": entry["id"]} if id_ok and isinstance(entry, dict) and "id" in entry else {}
    return {"secret": "?" * MIN_PSK, **ids}  # never used: a file with errors gives no Config


def _ike(
    doc: Mapping[str, Any], clean: Callable[..., bool], table: Callable[..., bool], pools: Mapping[str, Any],
    read_file: Callable[[str], str], env: Mapping[str, str], read_bytes: Callable[[str], bytes] | None,
) -> IkeSettings:  # fmt: skip
    """``[connections]`` the schema accepted, with the secrets and pools it accepted.

    A secret in error is left out, and so are the connections naming a pool in error; the errors that
    only follow from that (no PSK or private key found for a connection) are not reported twice.
    """
    from ipsecstack.connections import IkeSettings, parse_connections

    declared = doc.get("pools", {}) if table("pools") else None

    def pools_usable(c: Mapping[str, Any]) -> bool:
        names = _names(c.get("pools", []))
        return not names if declared is None else not any(n in declared and n not in pools for n in names)

    usable = {name: c for name, c in doc.get("connections", {}).items()
              if clean("connections", name) and pools_usable(c)}  # fmt: skip
    secrets: dict[str, dict[str, Any]] = {}
    if table("secrets"):
        for section, entries in doc.get("secrets", {}).items():
            if table("secrets", section) and section in _SECRET_SECTIONS:
                secrets[section] = {n: t for n, t in entries.items() if clean("secrets", section, n)}
                if section == "ike":  # stand-ins, so that the connections using them are checked all the same
                    secrets[section] |= {n: _stand_in(t, clean("secrets", section, n, "id"))
                                         for n, t in entries.items() if n not in secrets[section]}  # fmt: skip
    dropped = secrets != doc.get("secrets", {})
    try:
        return parse_connections({"connections": usable, "secrets": secrets}, read_file, env, pools, read_bytes)
    except ConfigError as e:
        if not dropped:
            raise
        rest = [x for x in e.errors if not x.field.startswith("secrets.") and x.value != "<certificate>"]
        if rest:
            raise ConfigErrors.of(rest) from None
        return IkeSettings([], [], [])


def _cross_checks(agent: AgentConfig, manual: list[ManualConnection], peers: list[PeerConfig]) -> None:
    """What needs the whole file: the backends the children need, and what the agent gives the peers."""
    resolve_backends(agent, manual, peers)
    for peer in peers:
        ah = next((ch.name for ch in peer.children if ch.protocol == "ah"), None)
        if ah is not None and agent.outer_backend == "udp":
            # the udp backend sends everything as ESP in UDP (agent/services.py forces encap); AH needs raw IP
            raise ConfigError("agent.outer_backend", "udp", f"connections.{peer.name}.children.{ah}.ah_proposals "
                              "needs IP protocol 51, which the udp backend cannot carry (ESP in UDP only, RFC 3948): "
                              'use outer_backend = "raw" (tunnel mode) or nfqueue (transport mode)')  # fmt: skip
        peer.retransmit_timeout = agent.retransmit_timeout
        peer.retransmit_base = agent.retransmit_base
        peer.retransmit_tries = agent.retransmit_tries


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


def resolve_datapath(a: AgentConfig, env: Mapping[str, str]) -> str:
    """The ESP engine to run: ``[agent] datapath``, else ``IPSECSTACK_DATAPATH``, else native where built."""
    from ipsecstack import native

    if a.datapath is None:
        wanted = env.get("IPSECSTACK_DATAPATH", "").strip().lower()
        a.datapath = "python" if wanted == "python" or not native.available else "native"
    return a.datapath


def build_datapath(cfg: Config, now: float, env: Mapping[str, str] | None = None) -> Datapath:
    """A Datapath (with the engine ``resolve_datapath`` picks) with every manual connection's SAs and policies."""
    engine = None
    if resolve_datapath(cfg.agent, os.environ if env is None else env) == "native":
        from ipsecstack.native import Engine

        engine = Engine()
    ports = {c.encap_port for c in cfg.manual if c.encap} or {cfg.agent.encap_port}
    dp = Datapath(encap_ports=ports, engine=engine)
    for c in cfg.manual:
        for sa in manual_sas(c):
            dp.install(sa, now)
        for pol in manual_policies(c):
            dp.spd.add(pol)
    return dp
