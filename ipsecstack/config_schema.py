"""The configuration file's shape, declared once: types, enumerations, ranges and known keys of every table.

This is the first of two layers that read a configuration (``config.parse``): the raw TOML document is
validated here, with pydantic in strict mode, before any meaning check runs. Strict means nothing is
coerced: ``encap = "no"`` is not a boolean, ``id = ["a.example"]`` is not a string, ``local_port =
"500"`` is not an integer; ``extra="forbid"`` makes every misspelt key an error that lists the keys
known there. Where swanctl.conf and the code accept two forms (a list of strings or one comma-separated
string; a duration as seconds or ``"30s"``), the key takes both and nothing else.

The second layer, the project's own meaning checks (proposals, traffic selectors, addresses, files,
secrets, combinations of keys), lives in ``config.py``, ``connections.py``, ``pki.py`` and ``ike/``;
it runs on the same raw document, now known to be well typed, and builds the dataclasses.

:func:`check` turns every validation error into a :class:`ConfigError` in the project's style: the key
path (``connections.gw.children.net.mode``), the value (never a secret: values under secret keys, and
unknown keys under ``[secrets]``, show as ``<secret>``) and the fix, which is the key's description
below. The same descriptions go into the JSON Schema for editors (:func:`json_schema`,
``ipsecstack schema``, ``deploy/ipsecstack.schema.json``).
"""

from __future__ import annotations

import reprlib
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema

from ipsecstack.errors import ConfigError

# keys whose values are key material or pre-shared keys: never shown in an error
SECRET_KEYS = frozenset({"secret", "key_in", "key_out"})
# under [secrets], only these keys name something that is not itself a secret
_PUBLIC_SECRET_KEYS = frozenset({"id", "file", "secret_file", "secret_env"})

# Discriminated unions: pydantic reports errors only for the form the value has (a string or a list),
# and these tags mark that form in an error's location; they are dropped from the key path.
_STR, _LIST, _NUM = "<string>", "<list>", "<number>"
_TAGS = frozenset({_STR, _LIST, _NUM})


def _form(value: Any) -> str | None:
    if isinstance(value, str):
        return _STR
    if isinstance(value, list):
        return _LIST
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _NUM
    return None


_WRONG = "wrong_type"
NonEmpty = Annotated[str, Field(min_length=1)]
# a list of strings, or one comma-separated string (swanctl.conf's lists; connections._list splits it)
StrList = Annotated[
    Union[Annotated[str, Tag(_STR)], Annotated[list[str], Tag(_LIST)]],  # noqa: UP007 - Tag needs Union
    Discriminator(_form, custom_error_type=_WRONG, custom_error_message="give a list of strings (or one string)"),
]
# swanctl durations: seconds, or 30s / 10m / 1h / 2d (config.parse_duration)
Duration = Annotated[
    Union[  # noqa: UP007
        Annotated[str, Field(pattern=r"^\s*[0-9]+(\.[0-9]+)?\s*[smhd]?\s*$"), Tag(_STR)],
        Annotated[float, Field(ge=0, allow_inf_nan=False), Tag(_NUM)],
    ],
    Discriminator(_form, custom_error_type=_WRONG, custom_error_message="give seconds or a duration like 30s"),
]
# byte/packet counts with an optional k/M/G suffix (config.parse_size)
Size = Annotated[
    Union[  # noqa: UP007
        Annotated[str, Field(pattern=r"^\s*[0-9]+\s*[kKmMgG]?\s*$"), Tag(_STR)],
        Annotated[int, Field(ge=0, le=(1 << 64) - 1), Tag(_NUM)],
    ],
    Discriminator(_form, custom_error_type=_WRONG, custom_error_message="give a count like 1000, 500k or 2M"),
]
Port = Annotated[int, Field(ge=0, le=65535)]
ListenPort = Annotated[int, Field(ge=1, le=65535)]
Spi = Annotated[int, Field(ge=0x100, le=0xFFFFFFFF)]

_DEFAULT_IKE = "aes128gcm16-prfsha256-x25519"
_DURATION = "seconds or a duration like 30s, 10m, 1h, 2d"
_SIZE = "a count like 1000, 500k, 2M or 1G"
_TS = ("traffic selectors in swanctl syntax: a list of CIDR strings, each optionally with [proto/port], "
       'e.g. ["10.1.0.0/16", "10.3.0.0/16[tcp/443]"]')  # fmt: skip


def key(description: str, default: Any = None) -> Any:
    """A key of a table: its description is the fix shown when its value is refused."""
    return Field(default, description=description)


def required(description: str) -> Any:
    return Field(description=description)


class _Table(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Agent(_Table):
    """[agent]: packet I/O backends, logging, sockets and IKE retransmission of the daemon."""

    inner_backend: Literal["tun", "nfqueue", "memory"] | None = key(
        "the plaintext side: use one of tun, nfqueue, memory, or leave it out: it follows from the children"
    )
    outer_backend: Literal["raw", "udp", "nfqueue", "memory"] | None = key(
        "the protected side: use one of raw, udp, nfqueue, memory, or leave it out: it follows from the children"
    )
    datapath: Literal["native", "python"] | None = key(
        "the ESP engine: native (the C engine) or python; leave it out for native where it was built, else python"
    )
    offloads: bool = key(
        "the datapath's offloads (TUN TSO with coalescing, UDP GSO/GRO; NFQUEUE: inbound TCP coalescing): "
        "true or false (default true)",
        True,
    )
    codel_target_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = key(
        "CoDel on the native engine's ESP receive queue (RFC 8289): drops start once datagrams have waited "
        "longer than this for a whole interval; 0..1000 ms, 0 turns it off (default 5)",
        5.0,
    )
    codel_interval_ms: Annotated[float, Field(ge=1, le=60000, allow_inf_nan=False)] = key(
        "CoDel's interval: about the longest round-trip time of the tunnel's flows, 1..60000 ms (default 100)",
        100.0,
    )
    tun_name: Annotated[str, Field(pattern=r"^[^/\s]{1,15}$")] = key(
        "the TUN device's name: 1 to 15 characters, no '/' or spaces (default ipsec0)", "ipsec0"
    )
    tun_mtu: Annotated[int, Field(ge=68, le=65535)] | None = key(
        "the TUN device's MTU, 68..65535 (default: the link MTU less the ESP overhead)"
    )
    tun_txqueuelen: Annotated[int, Field(ge=1, le=100000)] | None = key(
        "the TUN device's queue in packets, fixed, 1..100000 (default: sized to tun_queue_kb as traffic goes)"
    )
    tun_queue_kb: Annotated[int, Field(ge=0, le=1048576)] = key(
        "the TUN device's queue kept near this many KiB: its length follows the size of the packets in it, so a "
        "bulk TCP flow cannot queue tens of ms in front of other traffic; 0..1048576, 0 keeps the kernel's 500 "
        "packets (default 1024)",
        1024,
    )
    tun_addrs: list[str] = key('the TUN device\'s addresses with prefix length, e.g. ["10.1.0.1/16"]', [])
    retransmit_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = key(
        "seconds before the first IKE retransmission (RFC 7296 §2.4): a positive number (default 2)", 2.0
    )
    retransmit_base: Annotated[float, Field(ge=1, allow_inf_nan=False)] = key(
        "the factor by which IKE retransmissions back off: at least 1 (default 1.8)", 1.8
    )
    retransmit_tries: Annotated[int, Field(ge=0, le=100)] = key(
        "IKE retransmissions before the peer is declared dead: 0..100 (default 5)", 5
    )
    control_socket: NonEmpty = key(
        "path of the CLI's control socket (default /run/ipsecstack/ipsecstack.sock)", "/run/ipsecstack/ipsecstack.sock"
    )
    metrics: str | None = key('the Prometheus endpoint as host:port, e.g. "127.0.0.1:9505" (off unless set)')
    user: str | None = key('a user name, e.g. "nobody": the daemon drops root to it once everything is open')
    nfqueue_out: Port = key("NFQUEUE number for the host's outbound packets: 0..65535 (default 10)", 10)
    nfqueue_in: Port = key("NFQUEUE number for inbound ESP/AH: 0..65535 (default 11)", 11)
    nfqueue_tcp: Port = key(
        "NFQUEUE number for the host's outbound TCP with the native engine and offloads on: the kernel hands "
        "it whole TCP super-packets, which the engine cuts and protects: 0..65535 (default 12)",
        12,
    )
    queue_bypass: bool = key("let traffic pass in clear while the agent is down (default false)", False)
    log_format: Literal["console", "json"] = key("use console or json", "console")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = key(
        "use debug, info (the default), warning, error or critical", "info"
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] = key("packets read per wake-up: use 1..4096 (default 64)", 64)
    encap_port: ListenPort = key("UDP port for NAT traversal and ESP in UDP (RFC 3948): 1..65535 (default 4500)",
                                 4500)  # fmt: skip
    mss_clamp: bool = key("clamp the TCP MSS to leave room for the ESP overhead (default true)", True)


class Manual(_Table):
    """[manual.<name>]: a manually keyed connection (two SAs, like ip xfrm state)."""

    mode: Literal["tunnel", "transport"] = key("use tunnel or transport (default tunnel)", "tunnel")
    protocol: Literal["esp", "ah"] = key("use esp or ah (default esp)", "esp")
    transform: str | None = key("a transform keyword, e.g. aes128gcm16, aes256-sha256 (AH: sha256)")
    local_addrs: Annotated[StrList, Field(description='this host\'s address: one IP address, e.g. "192.0.2.1"')]
    remote_addrs: Annotated[StrList, Field(description='the peer\'s address: one IP address, e.g. "192.0.2.2"')]
    local_ts: StrList | None = key(f"the local subnets, {_TS}; transport mode: this host's address")
    remote_ts: StrList | None = key(f"the remote subnets, {_TS}; transport mode: the peer's address")
    spi_in: Spi = required("the inbound SA's SPI: use 0x100..0xffffffff (0-255 are reserved, RFC 4303 §2.1); "
                           "TOML accepts hex: 0x1001")  # fmt: skip
    spi_out: Spi = required("the outbound SA's SPI: use 0x100..0xffffffff (0-255 are reserved, RFC 4303 §2.1); "
                            "TOML accepts hex: 0x1001")  # fmt: skip
    key_in: str | None = key("the inbound key as a hex string (colons and spaces allowed)")
    key_out: str | None = key("the outbound key as a hex string (colons and spaces allowed)")
    key_in_file: NonEmpty | None = key("a file holding the inbound key in hex, relative to this file")
    key_out_file: NonEmpty | None = key("a file holding the outbound key in hex, relative to this file")
    key_in_env: NonEmpty | None = key("an environment variable holding the inbound key in hex")
    key_out_env: NonEmpty | None = key("an environment variable holding the outbound key in hex")
    esn: bool = key("64-bit extended sequence numbers (RFC 4303 §2.2.1, default false)", False)
    replay_window: int = key("the anti-replay window: use 0 (off) or 32..1048576 (default 64)", 64)
    encap: bool = key("ESP in UDP (RFC 3948) on encap_port (default false)", False)
    encap_port: ListenPort = key("the UDP port of ESP in UDP: 1..65535 (default 4500)", 4500)
    tfc_padding: int = key("random TFC padding in bytes: use 0..1024 (default 0)", 0)
    life_time: Duration | None = key(f"hard lifetime of the SAs: {_DURATION}")
    life_bytes: Size | None = key(f"hard lifetime of the SAs in bytes: {_SIZE}")
    life_packets: Size | None = key(f"hard lifetime of the SAs in packets: {_SIZE}")


class Auth(_Table):
    """local / remote of a connection: how each side authenticates and who it is."""

    auth: Literal["psk", "pubkey"] = key("use psk or pubkey (certificates); EAP is not supported", "psk")
    id: str | None = key("one identity as a string: an IP address, an FQDN, user@fqdn, keyid:..., a DN "
                         "like \"C=CH, O=example, CN=gw.example\", or %any")  # fmt: skip
    certs: StrList = key('give a list of certificate files, e.g. ["x509/gw.pem"] (PEM or DER, relative to this '
                         "file)", [])  # fmt: skip
    cacerts: StrList = key('give a list of certificate files, e.g. ["x509ca/ca.pem"]: our chain (local) or the '
                           "trust anchors (remote)", [])  # fmt: skip
    crls: StrList = key('give a list of CRL files, e.g. ["x509crl/ca.crl"] (PEM or DER): revoked peer certificates '
                        "(remote.crls, with remote.auth = pubkey)", [])  # fmt: skip


class Child(_Table):
    """[connections.<name>.children.<child>]: a child SA, shaped like swanctl.conf."""

    local_ts: StrList | None = key(f"the local side, {_TS} (default: this host's address)")
    remote_ts: StrList | None = key(f"the remote side, {_TS} (default: the peer's address)")
    esp_proposals: StrList | None = key('ESP proposals in strongSwan keywords: a list of strings (or one '
                                        'comma-separated string), e.g. ["aes128gcm16"]')  # fmt: skip
    ah_proposals: StrList | None = key('AH proposals (integrity only, RFC 4302): a list of strings (or one '
                                       'comma-separated string), e.g. ["sha256"]')  # fmt: skip
    mode: Literal["tunnel", "transport"] = key("use tunnel or transport (default tunnel)", "tunnel")
    start_action: Literal["none", "start", "trap"] = key("use none, start or trap (default none)", "none")
    close_action: Literal["none", "clear", "trap", "route", "start", "restart"] = key(
        "use none, trap, start (or strongSwan's clear, route, restart); the default is none", "none"
    )
    dpd_action: Literal["clear", "none", "trap", "route", "restart", "start"] = key(
        "use clear, trap, restart (or strongSwan's none, route, start); the default is clear", "clear"
    )
    rekey_time: Duration | None = key(f"rekey the child SA after {_DURATION} (default 1h, 0: never)")
    life_time: Duration | None = key(f"hard lifetime, longer than rekey_time: {_DURATION}")
    rekey_bytes: Size | None = key(f"rekey after this many bytes: {_SIZE}")
    rekey_packets: Size | None = key(f"rekey after this many packets: {_SIZE}")
    replay_window: int = key("the anti-replay window: use 0 (off) or 32..1048576 (default 64)", 64)
    updown: str | None = key('give the absolute path of an executable script and its arguments, e.g. updown = '
                             '"/usr/local/sbin/ipsec-updown --flag"')  # fmt: skip


class Connection(_Table):
    """[connections.<name>]: an IKEv2 peer, shaped like swanctl.conf."""

    local_addrs: StrList = key('this host\'s address: one IPv4 or IPv6 address, e.g. ["192.0.2.1"]', [])
    remote_addrs: StrList = key('the peer\'s address, e.g. ["192.0.2.2"], or %any (the default)', ["%any"])
    local_port: Port = key("UDP port of IKE on this host: 0..65535 (default 500)", 500)
    remote_port: Port = key("the peer's IKE port: 0..65535 (default 500)", 500)
    proposals: StrList = key(
        'IKE proposals in strongSwan keywords: a list of strings (or one comma-separated string), e.g. ["aes128gcm16-'
        'prfsha256-x25519"] (the default)',
        [_DEFAULT_IKE],
    )
    local: Auth = key('this side: a table, e.g. { auth = "psk", id = "gw.example" }', Auth())
    remote: Auth = key('the peer: a table, e.g. { auth = "psk", id = "peer.example" }', Auth())
    children: dict[str, Child] = key("the child SAs: [connections.<name>.children.<child>] tables", {})
    version: Literal[2] = key("only IKEv2 (version = 2) is supported", 2)
    dpd_delay: Duration | None = key(f"dead peer detection interval: {_DURATION} (default off)")
    rekey_time: Duration | None = key(f"rekey the IKE SA after {_DURATION} (default 4h, 0: never)")
    reauth_time: Duration | None = key(f"reauthenticate after {_DURATION} (default 0: never)")
    over_time: Duration | None = key(f"hard lifetime beyond rekey_time: {_DURATION} (default 10% of rekey_time)")
    rand_time: Duration | None = key(f"up to this much earlier than rekey_time/reauth_time, at random: {_DURATION} "
                                     "(default 10% of each; 0: exactly on time)")  # fmt: skip
    encap: bool = key("force ESP in UDP (RFC 3948) even without a NAT (default false)", False)
    mobike: bool = key("MOBIKE (RFC 4555) is not supported yet: false, or leave it out", False)
    pools: StrList = key("names of [pools.<name>] tables: virtual IPs for remote-access clients", [])
    send_certreq: bool = key("send CERTREQ payloads for our trust anchors (default true)", True)
    unique: Literal["no", "never", "replace", "keep"] = key("use no (the default), never, replace or keep", "no")
    vips: StrList = key('use ["0.0.0.0"] to ask the peer for a virtual IPv4 address', [])


class IkeSecret(_Table):
    """[secrets.ike.<name>]: a pre-shared key, for the connection of that name or for the ids given."""

    id: StrList = key("the identities this key is for: a list of strings (or one string)", [])
    secret: str | None = key("the pre-shared key (0x-prefixed: hex); better secret_file or secret_env")
    secret_file: NonEmpty | None = key("a file holding the pre-shared key, relative to this file")
    secret_env: NonEmpty | None = key("an environment variable holding the pre-shared key")


class KeySecret(_Table):
    """[secrets.private.<name>]: a private key file (and its passphrase, if encrypted)."""

    file: NonEmpty = required('give the key file: file = "private/gw.pem" (PEM or DER, relative to this file)')
    secret: str | None = key("the passphrase of an encrypted key")
    secret_file: NonEmpty | None = key("a file holding the passphrase of an encrypted key")
    secret_env: NonEmpty | None = key("an environment variable holding the passphrase of an encrypted key")


_SECRETS_HINT = "use [secrets.ike.<name>] (PSKs) or [secrets.private.<name>] (keys)"


class Secrets(_Table):
    """[secrets]: pre-shared keys ([secrets.ike.<name>]) and private keys ([secrets.private.<name>])."""

    ike: dict[str, IkeSecret] = key("[secrets.ike.<name>] tables", {})
    private: dict[str, KeySecret] = key("[secrets.private.<name>] tables", {})
    rsa: dict[str, KeySecret] = key("[secrets.rsa.<name>]: as secrets.private", {})
    ecdsa: dict[str, KeySecret] = key("[secrets.ecdsa.<name>]: as secrets.private", {})
    pkcs8: dict[str, KeySecret] = key("[secrets.pkcs8.<name>]: as secrets.private", {})


class Pool(_Table):
    """[pools.<name>]: virtual IP addresses for remote-access clients (RFC 7296 §3.15)."""

    addrs: str = required('give a prefix or range, e.g. "10.9.0.0/24" or "10.9.0.10-10.9.0.99"')
    dns: list[str] = key('a list of resolver addresses, e.g. ["10.1.0.53"]', [])


class Document(_Table):
    """An ipsecstack configuration file."""

    agent: Agent = key("[agent]: the daemon's backends, logging and sockets", Agent())
    manual: dict[str, Manual] = key("[manual.<name>] tables: manually keyed connections", {})
    connections: dict[str, Connection] = key("[connections.<name>] tables: IKEv2 peers", {})
    secrets: Secrets = key("[secrets]: pre-shared keys and private keys", Secrets())
    pools: dict[str, Pool] = key("[pools.<name>] tables: virtual IPs for remote-access clients", {})


_UNKNOWN_HINT: dict[type[BaseModel], str] = {Secrets: _SECRETS_HINT}


# -- validation errors as ConfigErrors --------------------------------------------------------------

_MISSING = object()


class Shown:
    """A value for an error message, abbreviated (tables and long lists are not repeated whole)."""

    def __init__(self, value: Any) -> None:
        r = reprlib.Repr()  # Python 3.11 has no keyword arguments for these
        r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 3, 60, 60
        self.text = "<table>" if isinstance(value, dict) else r.repr(value)

    def __repr__(self) -> str:
        return self.text


def path_text(loc: tuple[str | int, ...]) -> str:
    """A location as the project writes key paths: ``connections.gw.proposals[0]``."""
    out = ""
    for el in loc:
        out += f"[{el}]" if isinstance(el, int) else (f".{el}" if out else el)
    return out or "<top>"


def _has(node: Any, el: str | int) -> bool:
    if isinstance(node, dict):
        return el in node
    return isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node)


def _clean(doc: Any, loc: tuple[str | int, ...], missing: bool) -> tuple[tuple[str | int, ...], Any]:
    """The location without union tags, and the value there (``_MISSING`` for a missing key)."""
    out: list[str | int] = []
    node = doc
    for i, el in enumerate(loc):
        if _has(node, el):
            node = node[el]
        elif el in _TAGS:
            continue
        elif missing and i == len(loc) - 1:
            node = _MISSING
        out.append(el)
    return tuple(out), node


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X; anything else as it is."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _locate(loc: tuple[str | int, ...]) -> tuple[type[BaseModel] | None, str | None]:
    """The table (model) holding the last key of ``loc``, and that key's description."""
    tp: Any = Document
    parent: type[BaseModel] | None = None
    desc: str | None = None
    for el in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            info: FieldInfo | None = tp.model_fields.get(el) if isinstance(el, str) else None
            if info is None:
                return parent, None
            desc, tp = info.description, info.annotation
        elif get_origin(tp) is dict:
            tp = _unwrap(get_args(tp)[1])
            parent = None
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                desc = tp.__doc__
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        else:
            break
    return parent, desc


def _problem(err: Mapping[str, Any]) -> str:
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    named = {"bool": "true or false (no quotes)", "int": "an integer", "string": "a string", "float": "a number",
             "list": "a list", "dict": "a table", "model": "a table", "model_attributes": "a table"}  # fmt: skip
    base = kind.removesuffix("_type")
    if kind.endswith("_type") and base in named:
        return f"expected {named[base]}"
    return {
        "missing": "this key is required",
        "literal_error": "not one of the allowed values",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be more than {ctx.get('gt')}",
        "less_than_equal": f"must be at most {ctx.get('le')}",
        "less_than": f"must be less than {ctx.get('lt')}",
        "string_pattern_mismatch": "not in the expected form",
        "string_too_short": "must not be empty",
        "string_too_long": "too long",
        "finite_number": "must be a finite number",
        "wrong_type": "wrong type",
    }.get(kind, str(err["msg"]))


def _masked(loc: tuple[str | int, ...], unknown: bool) -> bool:
    keys = [el for el in loc if isinstance(el, str)]
    if any(k in SECRET_KEYS for k in keys):
        return True
    if loc and loc[0] == "secrets" and (not keys or keys[-1] not in _PUBLIC_SECRET_KEYS):
        return True
    return unknown and bool(keys) and any(w in keys[-1].lower() for w in ("key", "secret", "psk", "pass"))


def _to_config_error(doc: Mapping[str, Any], err: Mapping[str, Any]) -> tuple[tuple[str | int, ...], ConfigError]:
    kind = err["type"]
    loc, value = _clean(doc, tuple(err["loc"]), kind == "missing")
    parent, desc = _locate(loc)
    if kind == "extra_forbidden":
        known = sorted(parent.model_fields) if parent is not None else []
        fix = f"unknown key; known keys here: {', '.join(known)}"
        if parent in _UNKNOWN_HINT:
            fix += f"; {_UNKNOWN_HINT[parent]}"
    else:
        fix = _problem(err) + (f"; {desc}" if desc else "")
    if value is _MISSING:
        shown: Any = "<missing>"
    elif _masked(loc, kind == "extra_forbidden"):
        shown = "<secret>"
    elif isinstance(value, dict | list) or (isinstance(value, str) and len(value) > 60):
        shown = Shown(value)
    else:
        shown = value
    return loc, ConfigError(path_text(loc), shown, fix)


def check(doc: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], ConfigError]]:
    """Every way ``doc`` (a parsed TOML document) does not fit the schema, with each error's location."""
    try:
        Document.model_validate(doc)
    except ValidationError as e:
        return [_to_config_error(doc, err) for err in e.errors(include_url=False)]
    return []


# -- JSON Schema for editors -----------------------------------------------------------------------


class _Generator(GenerateJsonSchema):
    """pydantic's JSON Schema, without the titles it derives from field names (editors show the descriptions)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def nullable_schema(self, schema: Any) -> Any:
        """TOML has no null: an optional key is one that may be left out."""
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: Any) -> Any:
        out = super().default_schema(schema)
        if out.get("default") is None or isinstance(out.get("default"), dict):  # "absent", or a whole table
            out.pop("default", None)
        return out


def json_schema() -> dict[str, Any]:
    """The configuration file's JSON Schema (``ipsecstack schema``; ``deploy/ipsecstack.schema.json``).

    Declared as draft-07, which editors' TOML servers (taplo) validate: the keywords pydantic emits are
    draft-07 ones, and its ``$defs`` are reached by JSON pointers, which every draft resolves.
    """
    body = Document.model_json_schema(schema_generator=_Generator)
    body.pop("title", None)
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "ipsecstack configuration", **body}
