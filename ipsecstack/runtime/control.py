"""The local control socket: how the ``ipsecstack`` CLI talks to a running daemon.

Protocol (documented for scripts too): a UNIX stream socket, by default
``/run/ipsecstack/ipsecstack.sock`` (``[agent] control_socket``), created mode 0600 in a 0700
directory, so only its owner (root) can connect. Each request is one line of JSON,
``{"cmd": "<command>", ...arguments}``; each answer is one line of JSON, ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "<message>"}``. Commands:

- ``status``: uptime, counters, drops by reason, IKE statistics;
- ``list-conns``: configured connections and whether each is up;
- ``list-sas``: IKE SAs and child SAs with algorithms, SPIs, traffic selectors, counters, rekey times;
- ``initiate`` (``name``), ``terminate`` (``name``): start or delete a connection's IKE SA;
- ``keys``: the current ESP and IKE keys, for ``ipsecstack keys --wireshark`` (capture decryption).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ipsecstack.ike import nat
from ipsecstack.ike.dn import dn_text
from ipsecstack.ike.session import id_text

DEFAULT_SOCKET = "/run/ipsecstack/ipsecstack.sock"
MAX_REQUEST = 4096


class ControlServer:
    def __init__(self, path: str, node: Any, ike: Any, log: Any) -> None:
        self.path = path
        self.node = node
        self.ike = ike
        self.log = log
        self.started = time.time()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._server is not None:
            return  # already listening (started early to drop privileges: ipsecstack/agent/services.py)
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()  # a stale socket from an earlier run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(64):  # bounded requests per connection
                line = await asyncio.wait_for(reader.readline(), timeout=30)
                if not line:
                    break
                if len(line) > MAX_REQUEST:
                    answer: dict[str, Any] = {"ok": False, "error": "request too long"}
                else:
                    answer = self.handle(line)
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'malformed request: send {"cmd": ...} as one JSON line'}
        handler = {
            "status": self._status, "list-conns": self._list_conns, "list-sas": self._list_sas,
            "initiate": self._initiate, "terminate": self._terminate, "keys": self._keys,
        }.get(cmd)  # fmt: skip
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            return {"ok": True, "result": handler(req)}
        except LookupError as e:
            return {"ok": False, "error": str(e.args[0]) if e.args else "not found"}

    # --- commands ---------------------------------------------------------------------------------

    def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"uptime": round(time.time() - self.started, 1), **self.node.counters()}
        if self.ike is not None:
            out["ike"] = {"sas": len(self.ike.manager.sas), **self.ike.manager.stats,
                          "keypairs": dict(self.ike.keypairs.stats), "errors": dict(self.ike.errors)}  # fmt: skip
        return out

    def _list_conns(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        conns = []
        if self.ike is not None:
            for name, peer in self.ike.manager.peers.items():
                sas = [sa for sa in self.ike.manager.by_name(name) if sa.established]
                conns.append({
                    "name": name, "kind": "ike", "local": peer.local_addr, "remote": peer.remote_addr or "%any",
                    "up": bool(sas), "children": [c.name for c in peer.children],
                    "proposals": [p.text for p in peer.proposals],
                })  # fmt: skip
        names = {sa.name for sa in self.node.datapath.sad if sa.reqid is None}
        for name in sorted(names):
            conns.append({"name": name, "kind": "manual", "up": True})
        return conns

    def _list_sas(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        self.node.datapath.refresh()
        child_sas = {sa.spi: sa for sa in self.node.datapath.sad}
        out: list[dict[str, Any]] = []
        if self.ike is not None:
            for sa in self.ike.manager.sas.values():
                entry: dict[str, Any] = {
                    "name": sa.cfg.name, "state": sa.state, "initiator": sa.initiator, "remote": sa.remote,
                    "remote_port": sa.remote_port, "spi_i": sa.spi_i.hex(), "spi_r": sa.spi_r.hex(),
                    "proposal": sa.chosen.describe() if sa.chosen else None, **nat.report(sa),
                    "rekey_at": sa.rekey_at, "reauth_at": sa.reauth_at, "children": [],
                    "local_id": id_text(*sa.local_identity), "remote_id": id_text(*sa.peer_id) if sa.peer_id else None,
                    "remote_auth": sa.peer_auth or None,
                    "remote_cert": dn_text(sa.peer_cert.subject.public_bytes()) if sa.peer_cert else None,
                    # an authenticated IKE message or ESP the datapath reported (RFC 7296 §2.4: DPD waits for it)
                    "heard_ago": round(max(0.0, self.ike.clock() - sa.last_heard), 1), "stats": dict(sa.stats),
                }  # fmt: skip
                for c in sa.children:
                    inb, outb = child_sas.get(c.spi_in), child_sas.get(c.spi_out)
                    entry["children"].append({
                        "name": c.child.name, "mode": c.mode, "protocol": c.protocol, "transform": c.transform,
                        "esn": c.esn,
                        "spi_in": f"0x{c.spi_in:08x}", "spi_out": f"0x{c.spi_out:08x}", "encap": bool(c.encap),
                        "local_ts": [str(r) for r in c.local_ts], "remote_ts": [str(r) for r in c.remote_ts],
                        "rekey_at": c.rekey_at,
                        "packets_in": inb.packets if inb else 0, "bytes_in": inb.bytes if inb else 0,
                        "packets_out": outb.packets if outb else 0, "bytes_out": outb.bytes if outb else 0,
                        "drops_in": dict(inb.drops) if inb else {},
                        "engine": "native" if inb is not None and inb.native else "python",
                    })  # fmt: skip
                out.append(entry)
        manual = [s for s in self.node.sa_counters() if s.get("name") and not any(
            s["spi"] == ch["spi_in"] or s["spi"] == ch["spi_out"] for e in out for ch in e["children"])]  # fmt: skip
        if manual:
            out.append({"name": "manual", "state": "installed", "sas": manual})
        return out

    def _conn(self, req: dict[str, Any]) -> str:
        name = req.get("name")
        if self.ike is None or name not in self.ike.manager.peers:
            raise LookupError(f"no IKE connection named {name!r}")
        return str(name)

    def _initiate(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._conn(req)
        if any(sa.state != "closed" for sa in self.ike.manager.by_name(name)):
            return {"initiated": False, "reason": "already up or negotiating"}
        self.ike.initiate(name)
        return {"initiated": True}

    def _terminate(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._conn(req)
        n = self.ike.terminate(name)
        return {"terminated": n}

    def _keys(self, req: dict[str, Any]) -> dict[str, Any]:
        esp = [
            {"spi": sa.spi, "protocol": sa.protocol, "transform": sa.transform, "direction": sa.direction,
             "src": sa.tunnel_src, "dst": sa.tunnel_dst, "key": sa_key(sa).hex(), "encap": sa.udp_encap}
            for sa in self.node.datapath.sad
        ]  # fmt: skip
        ike = []
        if self.ike is not None:
            for sa in self.ike.manager.sas.values():
                if sa.keys is None or sa.chosen is None:
                    continue
                ike.append({
                    "spi_i": sa.spi_i.hex(), "spi_r": sa.spi_r.hex(), "encr": sa.chosen.encr.keyword,
                    "integ": sa.chosen.integ.keyword if sa.chosen.integ and not sa.chosen.encr.aead else None,
                    "sk_ei": sa.keys.sk_ei.hex(), "sk_er": sa.keys.sk_er.hex(),
                    "sk_ai": sa.keys.sk_ai.hex(), "sk_ar": sa.keys.sk_ar.hex(),
                })  # fmt: skip
        self.log.warning("keys exported through the control socket", esp_sas=len(esp), ike_sas=len(ike))
        return {"esp": esp, "ike": ike}


def sa_key(sa: Any) -> bytes:
    """The key material an SA was created with (kept only for the explicit key export)."""
    key: bytes = sa.key_material
    return key


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Client side: one request, one answer. Raises OSError if the daemon is not there."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
