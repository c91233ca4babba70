"""``ipsecstack import-swanctl swanctl.conf``: convert a strongSwan configuration to ipsecstack TOML.

The swanctl.conf syntax (strongSwan's settings format): ``name { ... }`` sections, ``key = value``
lines (a value runs to the end of the line; comma-separated lists; optional double quotes), ``#``
comments, and ``include`` lines. The common subset is converted: ``connections`` (addresses, ports,
proposals, version, dpd_delay, rekey_time, reauth_time, over_time, rand_time, unique, encap, send_certreq,
``local``/``remote`` rounds with ``auth`` (psk, pubkey), ``id``, ``certs`` and ``cacerts``, and children with
``local_ts``, ``remote_ts``, ``esp_proposals`` or ``ah_proposals``, ``mode``, ``start_action``, ``close_action``,
``dpd_action``, ``rekey_time``) and ``secrets`` (``ike*`` sections with ``id``/``id-*`` and ``secret``; ``private*``,
``rsa*``, ``ecdsa*``, ``pkcs8*`` with ``file`` and ``secret``). Certificate and key file names are
made relative to the swanctl directory (``x509/``, ``x509ca/``, ``private/``...), where the converted
file is meant to live, as ipsecstack resolves them relative to its config file. Everything else is
listed by key path as not converted, never silently dropped (``updown`` among them: strongSwan's
``_updown`` drives its kernel, so the script is for the user to choose).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_CONN_KEYS = {"local_addrs", "remote_addrs", "local_port", "remote_port", "proposals", "version", "dpd_delay",
              "rekey_time", "reauth_time", "encap", "unique", "over_time", "rand_time", "send_certreq"}  # fmt: skip
_CHILD_KEYS = {"local_ts", "remote_ts", "esp_proposals", "ah_proposals", "mode", "start_action", "rekey_time",
               "close_action", "dpd_action"}  # fmt: skip
_LISTS = {"local_addrs", "remote_addrs", "proposals", "local_ts", "remote_ts", "esp_proposals", "ah_proposals"}
_DURATIONS = {"dpd_delay", "rekey_time", "reauth_time", "over_time", "rand_time"}


class SwanctlSyntaxError(ValueError):
    pass


def parse(text: str) -> dict[str, Any]:
    """The section tree of a swanctl.conf (values are raw strings)."""
    root: dict[str, Any] = {}
    stack = [root]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if '"' not in raw else _strip_comment(raw)
        while line:
            if line.startswith("}"):
                if len(stack) == 1:
                    raise SwanctlSyntaxError(f"line {lineno}: '}}' without an open section")
                stack.pop()
                line = line[1:].strip()
                continue
            m = re.match(r"^([A-Za-z0-9_.\-<>%]+)\s*\{", line)
            if m:
                section: dict[str, Any] = {}
                stack[-1][m.group(1)] = section
                stack.append(section)
                line = line[m.end() :].strip()
                continue
            m = re.match(r"^([A-Za-z0-9_.\-<>%]+)\s*=\s*(.*)$", line)
            if m:
                value = m.group(2).strip()
                if value.endswith("}") and not value.startswith('"'):
                    value, line = value[:-1].strip(), "}"
                else:
                    line = ""
                stack[-1][m.group(1)] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
                continue
            if line.startswith("include "):
                stack[-1].setdefault("__include__", []).append(line[8:].strip())
                break
            raise SwanctlSyntaxError(f"line {lineno}: cannot read {raw.strip()!r}")
    if len(stack) != 1:
        raise SwanctlSyntaxError("a section is not closed (missing '}')")
    return root


def _strip_comment(raw: str) -> str:
    out, quoted = [], False
    for ch in raw:
        if ch == '"':
            quoted = not quoted
        if ch == "#" and not quoted:
            break
        out.append(ch)
    return "".join(out).strip()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class Converted:
    toml: str
    skipped: list[str] = field(default_factory=list)


def convert(text: str) -> Converted:
    tree = parse(text)
    skipped: list[str] = []
    out: list[str] = []
    ah = False  # a child negotiates AH: it needs raw IP (the udp backend carries ESP in UDP only)
    for key in tree:
        if key not in ("connections", "secrets"):
            skipped.append(key)
    for name, conn in tree.get("connections", {}).items():
        path = f"connections.{name}"
        if not isinstance(conn, dict):
            skipped.append(path)
            continue
        out.append(f"[connections.{_key(name)}]")
        children: dict[str, Any] = {}
        rounds: dict[str, dict[str, Any]] = {}
        for k, v in conn.items():
            if k == "children" and isinstance(v, dict):
                children = v
            elif re.fullmatch(r"(local|remote)(-\w+)?", k) and isinstance(v, dict):
                side = k.split("-")[0]
                if side in rounds:
                    skipped.append(f"{path}.{k} (a second authentication round)")
                    continue
                rounds[side] = v
            elif k in _CONN_KEYS and isinstance(v, str):
                out.append(f"{k} = {_value(k, v)}")
            else:
                skipped.append(f"{path}.{k}")
        for side, r in rounds.items():
            items = []
            for k, v in r.items():
                if k == "auth" and isinstance(v, str):
                    kind = "pubkey" if re.match(r"(pubkey|rsa|ecdsa|ed25519)", v) else v
                    if kind not in ("psk", "pubkey"):
                        skipped.append(f"{path}.{side}.auth = {v} (only psk and pubkey are supported)")
                    elif kind != v:
                        skipped.append(f"{path}.{side}.auth = {v} (converted to pubkey: the constraint is dropped)")
                    items.append(f"auth = {json.dumps(kind)}")
                elif k == "id" and isinstance(v, str):
                    items.append(f"id = {json.dumps(v)}")
                elif k in ("certs", "cacerts") and isinstance(v, str):
                    sub = "x509" if k == "certs" else "x509ca"
                    items.append(f"{k} = {json.dumps([_in(sub, f) for f in _split(v)])}")
                else:
                    skipped.append(f"{path}.{side}.{k}")
            out.append(f"{side} = {{ {', '.join(items)} }}")
        out.append("")
        for cname, child in children.items():
            out.append(f"[connections.{_key(name)}.children.{_key(cname)}]")
            for k, v in child.items():
                if k == "ah_proposals" and "esp_proposals" in child:
                    # strongSwan offers both as alternatives; an ipsecstack child negotiates one: keep ESP
                    skipped.append(f"{path}.children.{cname}.{k} (esp_proposals given too: ESP is kept)")
                elif k in _CHILD_KEYS and isinstance(v, str):
                    ah = ah or k == "ah_proposals"
                    out.append(f"{k} = {_value(k, v)}")
                else:
                    skipped.append(f"{path}.children.{cname}.{k}")
            out.append("")
    for sname, sec in tree.get("secrets", {}).items():
        path = f"secrets.{sname}"
        key_dir = next((k for k in ("private", "rsa", "ecdsa", "pkcs8") if sname.startswith(k)), None)
        if key_dir is not None and isinstance(sec, dict) and "file" in sec:
            out.append(f"[secrets.private.{_key(sname[len(key_dir) :].lstrip('-_') or sname)}]")
            out.append(f"file = {json.dumps(_in(key_dir, sec['file']))}")
            if "secret" in sec:
                out.append(f"secret = {json.dumps(sec['secret'])}")
            skipped += [f"{path}.{k}" for k in sec if k not in ("file", "secret")]
            out.append("")
            continue
        if not sname.startswith("ike") or not isinstance(sec, dict):
            skipped.append(path)
            continue
        ids = [v for k, v in sec.items() if (k == "id" or k.startswith("id-")) and isinstance(v, str)]
        target = sname[3:].lstrip("-_") or sname
        out.append(f"[secrets.ike.{_key(target)}]")
        if ids:
            out.append(f"id = {json.dumps(ids)}")
        if "secret" in sec:
            out.append(f"secret = {json.dumps(sec['secret'])}")
        for k in sec:
            if k != "secret" and not (k == "id" or k.startswith("id-")):
                skipped.append(f"{path}.{k}")
        out.append("")
    header = ["# converted from swanctl.conf by 'ipsecstack import-swanctl'", "[agent]", 'inner_backend = "tun"',
              'outer_backend = "udp"', ""]  # fmt: skip
    if ah:
        header[3:4] = ["# AH (ah_proposals) is IP protocol 51: raw sockets, not ESP in UDP", 'outer_backend = "raw"']
    if skipped:
        header[1:1] = ["# not converted (no equivalent yet):"] + [f"#   {s}" for s in skipped]
    return Converted("\n".join(header + out).rstrip() + "\n", skipped)


def _in(directory: str, name: str) -> str:
    """swanctl resolves relative credential paths in its sub-directories (x509/, x509ca/, private/, ...)."""
    return name if name.startswith("/") else f"{directory}/{name}"


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_\-]+", name) else json.dumps(name)


def _value(key: str, v: str) -> str:
    if key in _LISTS:
        return json.dumps(_split(v))
    if key in ("local_port", "remote_port", "version") and v.isdigit():
        return v
    if key in ("encap", "send_certreq"):
        return "true" if v in ("yes", "true") else "false"
    return json.dumps(v)
