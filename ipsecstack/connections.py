"""``[connections.<name>]`` and ``[secrets.ike.<name>]``: IKEv2 peers, shaped like swanctl.conf.

    [connections.site-b]
    local_addrs = ["172.31.0.1"]
    remote_addrs = ["172.31.0.2"]
    proposals = ["aes128gcm16-prfsha256-x25519"]
    local = { auth = "psk", id = "a.example" }
    remote = { auth = "psk", id = "b.example" }

    [connections.site-b.children.net]
    local_ts = ["10.1.0.0/16"]
    remote_ts = ["10.2.0.0/16"]
    esp_proposals = ["aes128gcm16"]
    mode = "tunnel"
    start_action = "start"

    [secrets.ike.site-b]
    id = ["a.example", "b.example"]
    secret = "..."          # or secret_file / secret_env

Theory of operation: parsing only; every error names the key path. The result is a list of
:class:`ipsecstack.ike.session.PeerConfig` plus the children to start at launch.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipsecstack import pki
from ipsecstack.config_values import parse_duration, parse_size, parse_ts
from ipsecstack.errors import ConfigError, ConfigWarning, ErrorCollector
from ipsecstack.ike import proposals as props
from ipsecstack.ike.auth import Credentials
from ipsecstack.ike.certs import cert_has_id
from ipsecstack.ike.const import IdType, Protocol
from ipsecstack.ike.session import ChildConfig, PeerConfig, identity, is_wildcard
from ipsecstack.ike.ts import Range

_CONN_KEYS = {
    "local_addrs", "remote_addrs", "proposals", "local", "remote", "children", "version", "dpd_delay",
    "rekey_time", "reauth_time", "over_time", "rand_time", "encap", "mobike", "pools", "send_certreq", "unique",
    "local_port", "remote_port", "vips",
}  # fmt: skip
_CHILD_KEYS = {
    "local_ts", "remote_ts", "esp_proposals", "ah_proposals", "mode", "start_action", "close_action", "dpd_action",
    "rekey_time", "life_time", "rekey_bytes", "rekey_packets", "replay_window", "updown",
}  # fmt: skip
_AUTH_KEYS = {"auth", "id", "certs", "cacerts", "crls"}
# swanctl keys that are understood but have no effect yet: reported (``ipsecstack check`` and the log), never silent
_NOT_APPLIED: set[str] = set()
_DEFAULT_IKE = "aes128gcm16-prfsha256-x25519"
_DEFAULT_ESP = "aes128gcm16"
# strongSwan warns about shorter ones; with a PSK, whoever answers an IKE_SA_INIT can test guesses offline
MIN_PSK = 20


@dataclass
class IkeSettings:
    peers: list[PeerConfig]
    start: list[str]  # connection names with a child whose start_action is "start" (initiated at launch)
    trap: list[str]  # ... or "trap" (negotiated when traffic needs it); both get trap policies
    notices: list[str] = field(default_factory=list)  # keys accepted but not applied yet


def _list(value: Any, path: str) -> list[Any]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list):
        raise ConfigError(path, value, "give a list of strings (or one comma-separated string)")
    return value


def _single_addr(value: Any, path: str, allow_any: bool) -> str | None:
    items = _list(value, path)
    if allow_any and (not items or items == ["%any"]):
        return None
    if len(items) != 1:
        raise ConfigError(path, value, "give exactly one address (several addresses are not supported yet)")
    try:
        return str(ipaddress.ip_address(items[0]))
    except ValueError:
        raise ConfigError(path, items[0], "give an IPv4 or IPv6 address" + (" or %any" if allow_any else "")) from None


def _ts(value: Any, path: str) -> list[Range]:
    items = _list(value, path)
    if not items:
        raise ConfigError(path, value, "give at least one subnet, e.g. ['10.1.0.0/16']")
    return [Range.from_selector(parse_ts(x, f"{path}[{i}]")) for i, x in enumerate(items)]


def _psk(
    name: str, ids: tuple[str, str], secrets: Mapping[str, Any], read_file: Callable[[str], str], env: Mapping[str, str]
) -> bytes:
    # the secret named like the connection, else the one whose ids name most of (local id, remote id): with
    # [secrets.ike.a] id = ["gw", "client-a"] and [secrets.ike.b] id = ["gw", "client-b"], client-b's gets b
    best: tuple[int, str, dict[str, Any]] | None = None
    for sname, s in secrets.items():
        path = f"secrets.ike.{sname}"
        if not isinstance(s, dict):
            raise ConfigError(path, "...", "each secret is a table with id and secret")
        sid = s.get("id", [])
        sids = set(_list(sid, f"{path}.id")) if sid else set()
        rank = 3 if sname == name else len(sids & set(ids))
        if rank and (best is None or rank > best[0]):
            best = (rank, sname, s)
    if best is not None:
        _, sname, s = best
        path = f"secrets.ike.{sname}"
        sources = [k for k in ("secret", "secret_file", "secret_env") if k in s]
        if len(sources) != 1:
            raise ConfigError(f"{path}.secret", "<missing>", "give exactly one of secret, secret_file, secret_env")
        src = sources[0]
        raw = s[src]
        if src == "secret_file":
            try:
                raw = read_file(raw).strip()
            except OSError as e:
                raise ConfigError(f"{path}.secret_file", raw, f"cannot read it: {e.strerror}") from None
        elif src == "secret_env":
            if raw not in env:
                raise ConfigError(f"{path}.secret_env", raw, "that environment variable is not set")
            raw = env[raw]
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{path}.{src}", "<secret>", "the secret must be a non-empty string")
        if raw.startswith("0x"):
            try:
                return _strong(bytes.fromhex(raw[2:]), f"{path}.{src}")
            except ValueError:
                raise ConfigError(f"{path}.{src}", "<secret>", "0x-prefixed secrets must be hex") from None
        return _strong(raw.encode(), f"{path}.{src}")
    raise ConfigError(f"secrets.ike.{name}", "<missing>", f"add a [secrets.ike.{name}] with the pre-shared key")


def _strong(psk: bytes, path: str) -> bytes:
    """A short PSK works, with a warning: it needs as much unpredictability as the keys it protects (RFC 7296 §2.15)."""
    if len(psk) < MIN_PSK:
        fix = (
            f"only {len(psk)} bytes: whoever answers one IKE_SA_INIT can test guesses offline (RFC 7296 "
            f"§2.15); use at least {MIN_PSK} random characters, e.g. the output of openssl rand -base64 30"
        )
        warnings.warn(ConfigWarning(path, "<secret>", fix), stacklevel=2)
    return psk


def _one_family(lts: list[Range], rts: list[Range], cpath: str) -> None:
    """local_ts and remote_ts with no address family in common can never match a packet (RFC 7296 §2.9)."""
    local, remote = {r.start.version for r in lts}, {r.start.version for r in rts}
    if not local & remote:  # then each side has one family
        fix = (
            f"local_ts is IPv{min(local)} only and remote_ts IPv{min(remote)} only: no packet can match both; "
            "give subnets of one family on both sides (or one child per family)"
        )
        raise ConfigError(f"{cpath}.remote_ts", [n for r in rts for n in r.networks()], fix)


def _authentication(
    name: str,
    c: Mapping[str, Any],
    local_addr: str,
    remote_addr: str | None,
    secrets: Mapping[str, Any],
    read_file: Callable[[str], str],
    read_bytes: pki.ReadBytes,
    env: Mapping[str, str],
) -> tuple[tuple[int, bytes], tuple[int, bytes] | None, bytes, Credentials]:
    """``local``/``remote`` of one connection: identities, the PSK if either side uses one, certificates."""
    path = f"connections.{name}"
    kinds, texts, certs, cacerts, crls = [], [], [], [], []
    for side in ("local", "remote"):
        t = c.get(side, {})
        if not isinstance(t, dict):
            raise ConfigError(f"{path}.{side}", t, 'a table, e.g. { auth = "psk", id = "gw.example" }')
        for k in t:
            if k not in _AUTH_KEYS:
                raise ConfigError(f"{path}.{side}.{k}", t[k], f"unknown key; known: {', '.join(sorted(_AUTH_KEYS))}")
        kind = t.get("auth", "psk")
        if kind not in ("psk", "pubkey"):
            raise ConfigError(f"{path}.{side}.auth", kind, "use psk or pubkey (certificates); EAP is not supported")
        kinds.append(kind)
        certs.append(pki.load_certs(t.get("certs", []), f"{path}.{side}.certs", read_bytes))
        cacerts.append(pki.load_certs(t.get("cacerts", []), f"{path}.{side}.cacerts", read_bytes))
        crls.append(pki.load_crls(t.get("crls", []), f"{path}.{side}.crls", read_bytes))
        texts.append(str(t["id"]) if "id" in t else None)
    ids: list[tuple[int, bytes] | None] = []
    for side, text in zip(("local", "remote"), texts, strict=True):
        try:
            ids.append(None if text in (None, "%any") else identity(str(text)))
        except ValueError as e:
            raise ConfigError(f"{path}.{side}.id", text, f"{e}; e.g. 'C=CH, O=example, CN=gw.example'") from None
    if is_wildcard(ids[0]):
        raise ConfigError(f"{path}.local.id", texts[0], "'*' patterns are for remote.id (which peers a connection "
                          "accepts); our own identity is exact")  # fmt: skip
    key = None
    if kinds[0] == "pubkey":
        if not certs[0]:
            raise ConfigError(f"{path}.local.certs", "<missing>", 'local.auth = pubkey needs certs = ["x509/me.pem"]')
        key = pki.key_for(certs[0][0], pki.load_private_keys(secrets, read_bytes, env), f"{path}.local.certs[0]")
        if ids[0] is None:
            # strongSwan's default: the subject DN of our certificate (RFC 4945 §3.1.5)
            ids[0] = (IdType.ID_DER_ASN1_DN, certs[0][0].subject.public_bytes())
        elif not cert_has_id(certs[0][0], *ids[0]):
            raise ConfigError(f"{path}.local.id", texts[0], "not in our certificate (subject or subjectAltName); "
                              "peers would reject it: use one of them or leave id unset")  # fmt: skip
    if kinds[1] == "pubkey" and not (cacerts[1] or certs[1]):
        fix = 'remote.auth = pubkey needs trust anchors (cacerts = ["x509ca/ca.pem"]) or the peer\'s certs'
        raise ConfigError(f"{path}.remote.cacerts", "<missing>", fix)
    if kinds[1] == "psk" and (cacerts[1] or certs[1]):
        raise ConfigError(f"{path}.remote.cacerts", "...", "certificates are only used with remote.auth = pubkey")
    if crls[0]:
        raise ConfigError(f"{path}.local.crls", "...", "CRLs are for checking the peer's certificate: use remote.crls")
    if kinds[1] == "psk" and crls[1]:
        raise ConfigError(f"{path}.remote.crls", "...", "CRLs are only used with remote.auth = pubkey")
    local_id = ids[0] or identity(local_addr)
    psk = b""
    if "psk" in kinds:
        remote_text = texts[1] or remote_addr or "%any"
        psk = _psk(name, (texts[0] or local_addr, remote_text), secrets.get("ike", {}), read_file, env)
    send_certreq = c.get("send_certreq", True)
    if not isinstance(send_certreq, bool):
        raise ConfigError(f"{path}.send_certreq", send_certreq, "true or false")
    creds = Credentials(
        kinds[0], kinds[1], key, certs[0] + tuple(x for x in cacerts[0] if not pki.is_self_signed(x)),
        cacerts=cacerts[1], peer_certs=certs[1], send_certreq=send_certreq, crls=crls[1],
    )  # fmt: skip
    return local_id, ids[1], psk, creds


# strongSwan's synonyms (vici accepts both), by key: what the user wrote -> what we store
_ACTIONS = {
    "close_action": {"none": "none", "clear": "none", "trap": "trap", "route": "trap", "start": "start",
                     "restart": "start"},
    "dpd_action": {"clear": "clear", "none": "clear", "trap": "trap", "route": "trap", "restart": "restart",
                   "start": "restart"},
}  # fmt: skip
_UNIQUE = ("no", "never", "replace", "keep")


def _action(ch: Mapping[str, Any], key: str, cpath: str, path: str, remote_addr: str | None) -> str:
    """``close_action`` / ``dpd_action`` of a child, normalised; the ones that negotiate again need a peer."""
    default = "none" if key == "close_action" else "clear"
    value = ch.get(key, default)
    allowed = _ACTIONS[key]
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{cpath}.{key}", value, f"use {', '.join(dict.fromkeys(allowed.values()))}")
    action = allowed[value]
    if action not in ("none", "clear") and remote_addr is None:
        raise ConfigError(f"{path}.remote_addrs", "%any", f"{key} = {value} negotiates again: give a remote address")
    return action


def _updown(value: Any, path: str) -> tuple[str, ...]:
    """``updown``: an executable and its arguments, like strongSwan's (run without a shell)."""
    import os
    import shlex

    example = 'e.g. updown = "/usr/local/sbin/ipsec-updown --flag"'
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, value, f"give the absolute path of an executable script, {example}")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as e:
        raise ConfigError(path, value, f"cannot split it into arguments ({e}); {example}") from None
    script = argv[0]
    if not os.path.isabs(script):
        raise ConfigError(path, value, f"give an absolute path (the daemon's directory is not the file's), {example}")
    if not os.path.isfile(script):
        raise ConfigError(path, value, f"no such file: {script}; create it or fix the path")
    if not os.access(script, os.X_OK):
        raise ConfigError(path, value, f"{script} is not executable: chmod +x it")
    return argv


def _child_proposals(ch: Mapping[str, Any], cpath: str, path: str, encap: bool) -> list[props.Algorithms]:
    """``esp_proposals`` or ``ah_proposals`` (AH, RFC 4302: integrity only) of a child; ESP by default."""
    if "ah_proposals" not in ch:
        esp_list = _list(ch.get("esp_proposals", [_DEFAULT_ESP]), f"{cpath}.esp_proposals")
        if not esp_list:
            raise ConfigError(f"{cpath}.esp_proposals", ch["esp_proposals"], 'give at least one, e.g. ["aes128gcm16"]')
        return [props.parse(p, Protocol.ESP, f"{cpath}.esp_proposals[{i}]") for i, p in enumerate(esp_list)]
    key = f"{cpath}.ah_proposals"
    if "esp_proposals" in ch:
        # strongSwan would offer both protocols as alternatives; a child here negotiates one of them
        raise ConfigError(key, ch["ah_proposals"], "give either esp_proposals (encryption) or ah_proposals "
                          "(authentication only), not both; for both, define two children")  # fmt: skip
    ah_list = _list(ch["ah_proposals"], key)
    if not ah_list:
        raise ConfigError(key, ch["ah_proposals"], 'give at least one, e.g. ["sha256"], or remove it for ESP')
    if encap:
        raise ConfigError(f"{path}.encap", True, f"{key} is set: AH cannot be UDP-encapsulated (RFC 3948 "
                          "carries ESP only; AH authenticates the outer IP header): remove encap or use "
                          "esp_proposals")  # fmt: skip
    return [props.parse(p, Protocol.AH, f"{key}[{i}]") for i, p in enumerate(ah_list)]


def _ike_lifetime(c: Mapping[str, Any], path: str, ike_rekey: float) -> tuple[str, float | None]:
    """``unique`` and ``over_time`` of a connection (None: strongSwan's default, 10% of rekey_time)."""
    unique = c.get("unique", "no")
    if not isinstance(unique, str) or unique not in _UNIQUE:
        raise ConfigError(f"{path}.unique", unique, "use no (the default), never, replace or keep")
    if "over_time" not in c:
        return unique, None
    over = parse_duration(c["over_time"], f"{path}.over_time")
    if over <= 0:
        raise ConfigError(f"{path}.over_time", c["over_time"], "give a positive duration such as '10m' "
                          "(the default is 10% of rekey_time)")  # fmt: skip
    if not ike_rekey:
        raise ConfigError(f"{path}.over_time", c["over_time"], "it bounds IKE SA rekeying, which rekey_time = 0 "
                          "turns off: remove over_time or set rekey_time")  # fmt: skip
    return unique, over


def _rand_time(c: Mapping[str, Any], path: str, ike_rekey: float, reauth: float) -> float | None:
    """strongSwan's ``rand_time``: IKE rekeys and reauthentications happen up to this much early, at random, so
    both ends rarely start at once (RFC 7296 §2.8.1); 0 turns that off. None (not set): 10% of each time."""
    if "rand_time" not in c:
        return None
    rand = parse_duration(c["rand_time"], f"{path}.rand_time")
    for key, t in (("rekey_time", ike_rekey), ("reauth_time", reauth)):
        if t and rand >= t:
            raise ConfigError(f"{path}.rand_time", c["rand_time"], f"must be shorter than {key} ({t:g}s), from which "
                              "a random part of it is subtracted; 0 turns the randomness off")  # fmt: skip
    return rand


def parse_connections(
    doc: Mapping[str, Any],
    read_file: Callable[[str], str],
    env: Mapping[str, str],
    pools: Mapping[str, Any] | None = None,
    read_bytes: pki.ReadBytes | None = None,
) -> IkeSettings:
    conns = doc.get("connections", {})
    secrets = doc.get("secrets", {})
    for k, v in secrets.items():
        if k not in ("ike", *pki.KEY_SECTIONS) or not isinstance(v, dict):
            raise ConfigError(
                f"secrets.{k}", "...", "use [secrets.ike.<name>] (PSKs) or [secrets.private.<name>] (keys)"
            )
    if read_bytes is None:
        read_bytes = lambda p: read_file(p).encode()  # noqa: E731 - PEM through the text reader
    peers: list[PeerConfig] = []
    start: list[str] = []
    trap: list[str] = []
    notices: list[str] = []

    def _connection(name: str, c: Any) -> None:
        nonlocal notices
        path = f"connections.{name}"
        if not isinstance(c, dict):
            raise ConfigError(path, c, "each connection is a table")
        for k in c:
            if k not in _CONN_KEYS:
                raise ConfigError(f"{path}.{k}", c[k], f"unknown key; known keys: {', '.join(sorted(_CONN_KEYS))}")
        notices += [f"{path}.{k}" for k in c if k in _NOT_APPLIED]
        if c.get("version", 2) != 2:
            raise ConfigError(f"{path}.version", c["version"], "only IKEv2 (version = 2) is supported")
        ike_rekey = parse_duration(c["rekey_time"], f"{path}.rekey_time") if "rekey_time" in c else 14400.0
        conn_pools = []
        for i, pname in enumerate(_list(c.get("pools", []), f"{path}.pools")):
            if pname not in (pools or {}):
                raise ConfigError(f"{path}.pools[{i}]", pname, f'define it: [pools.{pname}] addrs = "10.9.0.0/24"')
            conn_pools.append((pools or {})[pname])
        vips = _list(c.get("vips", []), f"{path}.vips")
        if any(v not in ("0.0.0.0", "%any") for v in vips):
            raise ConfigError(f"{path}.vips", c["vips"], 'use ["0.0.0.0"] to ask the peer for an IPv4 address')
        if c.get("mobike"):
            raise ConfigError(f"{path}.mobike", c["mobike"], "not supported yet; remove it")
        local_addr = _single_addr(c.get("local_addrs", []), f"{path}.local_addrs", False)
        remote_addr = _single_addr(c.get("remote_addrs", ["%any"]), f"{path}.remote_addrs", True)
        assert local_addr is not None
        reauth = parse_duration(c["reauth_time"], f"{path}.reauth_time") if "reauth_time" in c else 0.0
        if reauth and remote_addr is None:
            raise ConfigError(f"{path}.reauth_time", c["reauth_time"], "reauthentication initiates a new IKE SA "
                              "to the peer: set remote_addrs to its address, or remove reauth_time")  # fmt: skip
        ike_props = [props.parse(p, Protocol.IKE, f"{path}.proposals[{i}]")
                     for i, p in enumerate(_list(c.get("proposals", [_DEFAULT_IKE]), f"{path}.proposals"))]  # fmt: skip
        local_id, remote_id, psk, creds = _authentication(
            name, c, local_addr, remote_addr, secrets, read_file, read_bytes, env
        )
        children: list[ChildConfig] = []

        def _child(cname: str, ch: Any) -> None:
            nonlocal notices
            cpath = f"{path}.children.{cname}"
            for k in ch:
                if k not in _CHILD_KEYS:
                    raise ConfigError(f"{cpath}.{k}", ch[k], f"unknown key; known: {', '.join(sorted(_CHILD_KEYS))}")
            notices += [f"{cpath}.{k}" for k in ch if k in _NOT_APPLIED]
            mode = ch.get("mode", "tunnel")
            if mode not in ("tunnel", "transport"):
                raise ConfigError(f"{cpath}.mode", mode, "use tunnel or transport")
            lts = _ts(ch.get("local_ts", [local_addr]), f"{cpath}.local_ts")
            # a concentrator's clients get their address from a pool: their selectors are narrowed to it
            default_remote = [remote_addr] if remote_addr else (["0.0.0.0/0"] if conn_pools else [])
            rts = _ts(ch.get("remote_ts", default_remote), f"{cpath}.remote_ts")
            _one_family(lts, rts, cpath)
            esp = _child_proposals(ch, cpath, path, bool(c.get("encap", False)))
            action = ch.get("start_action", "none")
            if action not in ("none", "start", "trap"):
                raise ConfigError(f"{cpath}.start_action", action, "use none, start or trap")
            if action in ("start", "trap") and remote_addr is None:
                raise ConfigError(
                    f"{path}.remote_addrs", "%any", "a connection that starts itself needs a remote address"
                )
            if action == "start" and name not in start:
                start.append(name)
            if action in ("start", "trap") and name not in trap:
                trap.append(name)
            rekey = parse_duration(ch["rekey_time"], f"{cpath}.rekey_time") if "rekey_time" in ch else 3600.0
            window = ch.get("replay_window", 64)
            if not isinstance(window, int) or isinstance(window, bool) or not (window == 0 or 32 <= window <= 1 << 20):
                raise ConfigError(f"{cpath}.replay_window", window, "use 0 (off) or 32..1048576; the default is 64")
            life = parse_duration(ch["life_time"], f"{cpath}.life_time") if "life_time" in ch else None
            if life is not None and rekey and life <= rekey:
                raise ConfigError(f"{cpath}.life_time", ch["life_time"], "must be longer than rekey_time (default 1h)")
            volume = {k: parse_size(ch[k], f"{cpath}.{k}") for k in ("rekey_bytes", "rekey_packets") if k in ch}
            updown = _updown(ch["updown"], f"{cpath}.updown") if "updown" in ch else ()
            children.append(ChildConfig(cname, lts, rts, esp, mode, rekey_time=rekey or None, replay_window=window,
                                        life_time=life, rekey_bytes=volume.get("rekey_bytes"),
                                        rekey_packets=volume.get("rekey_packets"),
                                        close_action=_action(ch, "close_action", cpath, path, remote_addr),
                                        dpd_action=_action(ch, "dpd_action", cpath, path, remote_addr),
                                        updown=updown))  # fmt: skip

        child_errors = ErrorCollector()  # every child's errors, not only the first
        for cname, ch in c.get("children", {}).items():
            child_errors.run(_child, cname, ch)
        child_errors.raise_any()
        if not children:
            raise ConfigError(f"{path}.children", "<missing>", "define at least one child SA")
        unique, over_time = _ike_lifetime(c, path, ike_rekey)
        peers.append(PeerConfig(
            name, local_addr, remote_addr, ike_props, local_id, remote_id, psk, children, creds=creds,
            local_port=int(c.get("local_port", 500)), remote_port=int(c.get("remote_port", 500)),
            encap=bool(c.get("encap", False)), rekey_time=ike_rekey or None, pools=conn_pools,
            request_vip=bool(vips),
            dpd_delay=parse_duration(c["dpd_delay"], f"{path}.dpd_delay") or None if "dpd_delay" in c else None,
            unique=unique, over_time=over_time, reauth_time=reauth or None,
            rand_time=_rand_time(c, path, ike_rekey, reauth),
        ))  # fmt: skip

    errors = ErrorCollector()  # every connection's errors, not only the first
    for name, c in conns.items():
        errors.run(_connection, name, c)
    errors.raise_any()
    return IkeSettings(peers, start, trap, notices)
