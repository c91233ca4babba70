"""strongSwan's charon as an IKEv2/ESP peer inside a test network namespace.

This module has no tests of its own: ``StrongSwan`` is the harness that interop tests use to run a
real charon next to ipsecstack (or next to another charon, see ``test_harness.py``).

Recipe (what ``StrongSwan.start()`` does, step by step)
-------------------------------------------------------
1. Packages (Debian 12): ``strongswan-charon strongswan-swanctl libstrongswan-standard-plugins
   libcharon-extra-plugins libstrongswan-extra-plugins``. The *standard* plugins package is easy to
   miss: it holds the ``openssl`` and ``gcm`` plugins, without which ``aes128gcm16`` proposals fail.
   ``missing_requirements()`` lists what is absent so a test can skip with the reason.
2. A temp dir per instance (short, under /tmp, because the vici socket path must fit in
   ``sun_path``): ``strongswan.conf``, ``swanctl/swanctl.conf`` (plus the empty sub-directories
   swanctl scans next to it: x509, private, ... -- otherwise swanctl prints an error per directory),
   ``run/`` (becomes charon's /run), ``charon.log`` and ``charon.out`` (stdout/stderr).
3. strongswan.conf: ``load_modular = no`` and an explicit ``load = ...`` list (``PLUGINS``), so the
   host's /etc/strongswan.d is never consulted; ``filelog`` to charon.log with ``flush_line = yes``
   (default 1, ike 2, knl 1, net 1, cfg 1 unless overridden) and syslog off; and for the userspace
   ESP plugin (the kernel has no ESP/xfrm)::

       plugins.kernel-libipsec.allow_peer_ts = yes   # host-to-host TS (peer address inside remote_ts)
       plugins.socket-default.fwmark = 0x42          # IKE/ESP-in-UDP packets carry mark 0x42 ...
       plugins.kernel-netlink.fwmark = !0x42         # ... and the table-220 rule skips marked packets
       plugins.vici.socket = unix://<tmp>/run/charon.vici

4. charon runs as ``STRONGSWAN_CONF=<tmp>/strongswan.conf ip netns exec NS unshare -m
   --propagation private sh -c 'mount --bind <tmp>/run /run && exec <charon>'``. ``ip netns exec``,
   ``unshare`` (without --fork) and ``exec`` all replace the process, so ``Popen.pid`` *is* charon's
   PID and ``stop()`` signals it directly. The bind mount lives only in charon's private mount
   namespace, so it vanishes with charon: there is nothing to unmount on the host. Inside, charon
   writes /run/charon.pid into its own dir (two charons never collide); the vici socket path names
   the *host* path of that dir, which is the same directory seen from both sides, so swanctl
   reaches it from outside the namespace.
5. ``swanctl --load-all --file <tmp>/swanctl/swanctl.conf --uri unix://<sock>``, then
   ``swanctl --initiate --child NAME --timeout N --uri ...`` (the command always comes first).
6. State comes from ``swanctl --list-sas --pretty`` (see ``parse_pretty``): one ``list-sa event``
   block per IKE SA, ``key = value`` lines, ``name {`` ... ``}`` sections, ``key = [`` ... ``]``
   lists. No extra Python dependency (no ``vici`` package).

Using it (e.g. against ipsecstack in the other namespace)::

    with nsutil.netns_pair("x") as pair, strongswan(
        pair.b, local=pair.addr_b, remote=pair.addr_a, psk="...", conn="h2h"
    ) as peer:
        ...start ``python -m ipsecstack run -c FILE`` in pair.a (pair.a.ipsecstack(...)) ...
        peer.initiate()                      # or let ipsecstack initiate and just:
        ike, child = peer.wait_established(timeout=10)
        child.packets_in, child.spi_out      # parsed counters / SPIs; peer.logs() for charon.log

Failures raise ``StrongSwanError`` (an AssertionError) carrying swanctl's output and the tail of
charon's log. The temp dir is removed by ``stop()``; set ``IPSECSTACK_KEEP_SWAN=1`` to keep it.

Gotchas (all hit or verified while writing this)
------------------------------------------------
* kernel-libipsec is tunnel mode only, ESP only, no ESN, and **always UDP-encapsulated**: it fakes
  NAT detection (``list-sas`` shows ``nat-remote=yes nat-any=yes`` on a NAT-free veth), so both
  sides float to port 4500 after IKE_SA_INIT and ESP goes as ESP-in-UDP (non-ESP marker) on 4500.
  A peer (ipsecstack) must accept the NAT-D mismatch, the port float and UDP-encapsulated ESP.
* Child SA state is ``INSTALLED``, not ``ESTABLISHED`` (only the IKE SA is ``ESTABLISHED``).
* kernel-libipsec creates TUN ``ipsec0`` in charon's namespace and puts routes in table 220
  (e.g. ``172.31.x.2 dev ipsec0 src 172.31.x.1``) with rule ``220: not from all fwmark 0x42 lookup
  220``. Verified: without the fwmark pair the rule is unconditional, and as soon as the responder
  installs the child SA its own IKE_AUTH *response* to the peer's address is routed into ipsec0;
  the initiator only sees retransmits and ``initiate`` times out. Do not give ipsecstack's TUN the
  name ``ipsec0`` *in the same* namespace (in separate namespaces it does not matter).
* Verified: host-to-host (TS = the veth addresses /32) without ``allow_peer_ts = yes`` makes the
  responder answer IKE_AUTH with ``TS_UNACCEPTABLE`` (IKE SA up, no child SA).
* What a peer sees from this charon (useful against ipsecstack): IKE_SA_INIT carries NATD_S_IP,
  NATD_D_IP (the source hash is faked, so the *peer* concludes "the other side is behind NAT"),
  FRAG_SUP, HASH_ALG, REDIR_SUP; the IKE_AUTH request carries INITIAL_CONTACT, MOBIKE_SUPPORTED,
  ADDITIONAL_IP4/6_ADDRESS, MULTIPLE_AUTH_SUPPORTED, EAP_ONLY_AUTHENTICATION, IKEV2_MESSAGE_ID_SYNC
  notifies -- a peer must ignore the status notifies it does not know. IKE_AUTH already goes from
  4500 to 4500 (non-ESP marker), and ESP must be sent to it UDP-encapsulated on 4500: libipsec has
  no raw ESP socket, so plain proto-50 ESP is never received.
* This VM's kernel has no ``dummy`` module (``ip link add X type dummy`` fails): the subnet test
  uses a veth pair inside the namespace as the "LAN" interface instead.
* Verified: kernel-libipsec's route needs a ``src`` inside local_ts. With subnet selectors and no
  local address inside local_ts, the responder logs ``error installing route with policy ...`` /
  ``unable to install IPsec policies (SPD)`` and answers TS_UNACCEPTABLE. Put e.g. 10.1.0.1/16 on
  an interface in the namespace first (test_harness.py's ``subnet`` case).
* swanctl reads its credentials from directories next to the ``--file`` given; they are created
  empty here to keep its output clean.
* The PSK is written as ``0x<hex>`` in swanctl.conf (any bytes; no quoting issues). The ASCII string
  given to ``StrongSwan(psk=...)`` is used as-is, so ipsecstack can be given the same string.
* Debian ships an AppArmor profile for charon (/etc/apparmor.d/usr.lib.ipsec.charon); on a host
  where AppArmor is enforcing, charon may be denied the temp-dir files. This VM's kernel has no
  AppArmor, so it was not an issue here.
* ``swanctl --initiate`` waits for the result and streams charon's log; it exits non-zero when the
  exchange fails. Its ``--timeout`` is in seconds; the subprocess gets a slightly longer one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from tests.netns.nsutil import Netns

CHARON_CANDIDATES = (
    "/usr/lib/ipsec/charon",
    "/usr/libexec/ipsec/charon",
    "/usr/libexec/strongswan/charon",
    "/usr/lib/strongswan/charon",
)
PLUGIN_DIRS = ("/usr/lib/ipsec/plugins", "/usr/lib/x86_64-linux-gnu/ipsec/plugins", "/usr/libexec/ipsec/plugins")
PLUGINS = (
    "random",
    "nonce",
    "openssl",
    "aes",
    "sha1",
    "sha2",
    "hmac",
    "gcm",
    "chapoly",
    "curve25519",
    "kdf",
    "pem",
    "pkcs1",
    "pubkey",
    "x509",
    "kernel-libipsec",
    "kernel-netlink",
    "socket-default",
    "vici",
)
DEFAULT_LOG_LEVELS: dict[str, int] = {"default": 1, "ike": 2, "knl": 1, "net": 1, "cfg": 1}
SWANCTL_SUBDIRS = (
    "x509",
    "x509ca",
    "x509ocsp",
    "x509aa",
    "x509ac",
    "x509crl",
    "pubkey",
    "private",
    "rsa",
    "ecdsa",
    "bliss",
    "pkcs8",
    "pkcs12",
)
LOG_TAIL_LINES = 60


# --------------------------------------------------------------------------------------------- discovery


def find_charon() -> str | None:
    for path in CHARON_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("charon")


def find_swanctl() -> str | None:
    return shutil.which("swanctl") or next(
        (p for p in ("/usr/sbin/swanctl", "/usr/bin/swanctl") if os.access(p, os.X_OK)), None
    )


def missing_requirements(plugins: Sequence[str] = PLUGINS) -> list[str]:
    """What is missing to run ``StrongSwan`` (empty list: all there). Meant for ``pytest.skip``."""
    missing: list[str] = []
    if find_charon() is None:
        missing.append("charon binary (apt-get install strongswan-charon)")
    if find_swanctl() is None:
        missing.append("swanctl (apt-get install strongswan-swanctl)")
    if shutil.which("unshare") is None:
        missing.append("unshare (util-linux)")
    plugin_dir = next((d for d in PLUGIN_DIRS if os.path.isdir(d)), None)
    if plugin_dir is None:
        missing.append("strongSwan plugin directory")
    else:
        absent = [p for p in plugins if not os.path.exists(os.path.join(plugin_dir, f"libstrongswan-{p}.so"))]
        if absent:
            missing.append(
                f"strongSwan plugins {' '.join(absent)} (apt-get install libstrongswan-standard-plugins "
                "libstrongswan-extra-plugins libcharon-extra-plugins)"
            )
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun (kernel-libipsec needs TUN)")
    return missing


# --------------------------------------------------------------------------------------------- config text


def render_conf(section: Mapping[str, Any], indent: int = 0) -> str:
    """Render nested mappings as strongswan.conf / swanctl.conf syntax (``key = value``, ``name { }``)."""
    pad = "  " * indent
    out: list[str] = []
    for key, value in section.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            out.append(f"{pad}{key} {{")
            out.append(render_conf(value, indent + 1))
            out.append(f"{pad}}}")
        else:
            if isinstance(value, bool):
                text = "yes" if value else "no"
            elif isinstance(value, list | tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            if "\n" in text:
                raise ValueError(f"newline in config value for {key!r}")
            out.append(f"{pad}{key} = {text}")
    return "\n".join(line for line in out if line)


def _duration(value: int | float | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return f"{int(value)}s"


def host_prefix(addr: str) -> str:
    """``addr/32`` or ``addr/128``: a host traffic selector for a bare address."""
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{ip.max_prefixlen}"


# --------------------------------------------------------------------------------------------- list-sas


def parse_pretty(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``swanctl --pretty`` output into ``[(message_name, body), ...]``.

    The format (one vici message per top-level block)::

        list-sa event {          # message name, then "{"
          h2h {                  # section -> nested dict
            state = ESTABLISHED  # key = value -> str
            local-ts = [         # list -> list[str], one item per line, closed by "]"
              172.31.1.1/32
            ]
          }
        }

    Values are kept as strings (split on the first `` = `` only, so values may contain spaces).
    """
    messages: list[tuple[str, dict[str, Any]]] = []
    stack: list[dict[str, Any]] = []
    current_list: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if current_list is not None:
            if line == "]":
                current_list = None
            else:
                current_list.append(line)
            continue
        if line == "}":
            if stack:
                stack.pop()
            continue
        if line.endswith("{") and " = " not in line:
            name = line[:-1].strip()
            body: dict[str, Any] = {}
            if stack:
                stack[-1][name] = body
            else:
                messages.append((name, body))
            stack.append(body)
            continue
        key, sep, value = line.partition(" = ")
        if not sep or not stack:
            continue  # log lines or other noise outside of a message
        if value == "[":
            current_list = []
            stack[-1][key] = current_list
        else:
            stack[-1][key] = value
    return messages


@dataclass
class ChildSA:
    name: str  # the config name, e.g. "h2h"
    key: str  # the list-sas key, e.g. "h2h-1" (name-uniqueid)
    info: dict[str, Any]

    @property
    def state(self) -> str:
        return str(self.info.get("state", ""))

    def counter(self, key: str) -> int:
        return int(self.info.get(key, 0))

    @property
    def bytes_in(self) -> int:
        return self.counter("bytes-in")

    @property
    def bytes_out(self) -> int:
        return self.counter("bytes-out")

    @property
    def packets_in(self) -> int:
        return self.counter("packets-in")

    @property
    def packets_out(self) -> int:
        return self.counter("packets-out")

    @property
    def spi_in(self) -> int:
        return int(self.info["spi-in"], 16)

    @property
    def spi_out(self) -> int:
        return int(self.info["spi-out"], 16)


@dataclass
class IkeSA:
    name: str
    info: dict[str, Any]
    children: list[ChildSA] = field(default_factory=list)

    @property
    def state(self) -> str:
        return str(self.info.get("state", ""))

    def child(self, name: str) -> ChildSA | None:
        return next((c for c in self.children if c.name == name), None)


def sas_from_pretty(text: str) -> list[IkeSA]:
    sas: list[IkeSA] = []
    for msg, body in parse_pretty(text):
        if msg != "list-sa event":
            continue
        for ike_name, ike_info in body.items():
            if not isinstance(ike_info, dict):
                continue
            children = [
                ChildSA(str(c.get("name", key)), key, c)
                for key, c in (ike_info.get("child-sas") or {}).items()
                if isinstance(c, dict)
            ]
            sas.append(IkeSA(ike_name, ike_info, children))
    return sas


# --------------------------------------------------------------------------------------------- the harness


class StrongSwanError(AssertionError):
    """A strongSwan step failed; the message carries the command output and the tail of charon.log."""


class StrongSwan:
    """One charon instance with one connection ``conn`` (one child ``child``) in namespace ``ns``.

    ``local``/``remote`` are the outer (IKE) addresses; ``remote=None`` means ``%any`` (responder
    only). ``local_ts``/``remote_ts`` default to host selectors of ``local``/``remote``. Durations may
    be ints (seconds) or strongSwan strings ("1h"). ``conn_extra``/``child_extra`` add raw
    ``key = value`` options to the connection / child; ``extra_swanctl`` is appended verbatim at the
    top level of swanctl.conf (more connections, secrets, pools); ``extra_charon`` is appended
    inside the ``charon { }`` section of strongswan.conf.
    """

    def __init__(
        self,
        ns: Netns,
        *,
        local: str,
        remote: str | None,
        psk: str,
        local_ts: str | Sequence[str] | None = None,
        remote_ts: str | Sequence[str] | None = None,
        local_id: str | None = None,
        remote_id: str | None = None,
        ike_proposals: str = "aes128gcm16-prfsha256-x25519",
        esp_proposals: str = "aes128gcm16",
        conn: str = "peer",
        child: str | None = None,
        start_action: str = "none",
        ike_rekey_time: int | str | None = None,
        rekey_time: int | str | None = None,
        life_time: int | str | None = None,
        dpd_delay: int | str | None = None,
        dpd_action: str | None = None,
        mode: str = "tunnel",
        port: int = 500,
        port_nat_t: int = 4500,
        log_levels: Mapping[str, int] | None = None,
        plugins: Sequence[str] = PLUGINS,
        conn_extra: Mapping[str, Any] | None = None,
        child_extra: Mapping[str, Any] | None = None,
        extra_swanctl: str = "",
        extra_charon: str = "",
        keep_dir: bool | None = None,
        local_auth: Mapping[str, Any] | None = None,
        remote_auth: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self.ns = ns
        # certificate auth: local/remote replace the PSK defaults; files land in swanctl/ (x509/, private/, ...)
        self.local_auth, self.remote_auth, self.files = local_auth, remote_auth, dict(files or {})
        self.local, self.remote = local, remote
        self.conn = conn
        self.child = child or conn
        self.psk = psk
        self.local_ts = [local_ts] if isinstance(local_ts, str) else list(local_ts or [host_prefix(local)])
        if remote_ts is None:
            if remote is None:
                raise ValueError("remote_ts is required when remote is None (%any)")
            remote_ts = host_prefix(remote)
        self.remote_ts = [remote_ts] if isinstance(remote_ts, str) else list(remote_ts)
        self.local_id = local_id or local
        self.remote_id = remote_id or remote or "%any"
        self.ike_proposals, self.esp_proposals = ike_proposals, esp_proposals
        self.start_action = start_action
        self.ike_rekey_time, self.rekey_time, self.life_time = ike_rekey_time, rekey_time, life_time
        self.dpd_delay, self.dpd_action = dpd_delay, dpd_action
        self.mode = mode
        self.port, self.port_nat_t = port, port_nat_t
        self.log_levels = {**DEFAULT_LOG_LEVELS, **(log_levels or {})}
        self.plugins = list(plugins)
        self.conn_extra, self.child_extra = dict(conn_extra or {}), dict(child_extra or {})
        self.extra_swanctl, self.extra_charon = extra_swanctl, extra_charon
        self.keep_dir = bool(os.environ.get("IPSECSTACK_KEEP_SWAN")) if keep_dir is None else keep_dir

        charon, swanctl = find_charon(), find_swanctl()
        if charon is None or swanctl is None:
            raise StrongSwanError(f"strongSwan not installed: {'; '.join(missing_requirements(self.plugins))}")
        self.charon_bin, self.swanctl_bin = charon, swanctl
        self.dir = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
        self.run_dir = self.dir / "run"
        self.swanctl_dir = self.dir / "swanctl"
        self.strongswan_conf = self.dir / "strongswan.conf"
        self.swanctl_conf = self.swanctl_dir / "swanctl.conf"
        self.log_file = self.dir / "charon.log"
        self.out_file = self.dir / "charon.out"
        self.socket = self.run_dir / "charon.vici"
        if len(str(self.socket)) > 100:
            raise ValueError(f"vici socket path too long for sun_path: {self.socket}")
        self.uri = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    # ----------------------------------------------------------------------------------------- config

    def strongswan_conf_text(self) -> str:
        filelog = {
            "path": str(self.log_file),
            "time_format": "%H:%M:%S",
            "ike_name": True,
            "append": False,
            "flush_line": True,
            **self.log_levels,
        }
        charon = {
            "load_modular": False,
            "load": " ".join(self.plugins),
            "port": self.port,
            "port_nat_t": self.port_nat_t,
            "install_virtual_ip": False,
            "filelog": {"main": filelog},
            "syslog": {"daemon": {"default": -1}},
            "plugins": {
                "vici": {"socket": self.uri},
                "kernel-libipsec": {"allow_peer_ts": True},
                "socket-default": {"fwmark": "0x42"},
                "kernel-netlink": {"fwmark": "!0x42"},
            },
        }
        text = render_conf({"charon": charon})
        if self.extra_charon:
            text = text[: text.rindex("}")] + self.extra_charon.rstrip() + "\n}"
        return text + "\n"

    def swanctl_conf_text(self) -> str:
        child: dict[str, Any] = {
            "local_ts": self.local_ts,
            "remote_ts": self.remote_ts,
            "esp_proposals": self.esp_proposals,
            "mode": self.mode,
            "start_action": self.start_action,
            "rekey_time": _duration(self.rekey_time),
            "life_time": _duration(self.life_time),
            "dpd_action": self.dpd_action,
            **self.child_extra,
        }
        conn: dict[str, Any] = {
            "version": 2,
            "local_addrs": self.local,
            "remote_addrs": self.remote or "%any",
            "proposals": self.ike_proposals,
            "rekey_time": _duration(self.ike_rekey_time),
            "dpd_delay": _duration(self.dpd_delay),
            **self.conn_extra,
            "local": self.local_auth or {"auth": "psk", "id": self.local_id},
            "remote": self.remote_auth or {"auth": "psk", "id": self.remote_id},
            "children": {self.child: child},
        }
        secrets = {"ike-psk": {"id-local": self.local_id, "id-remote": self.remote_id, "secret": self._psk_hex()}}
        text = render_conf({"connections": {self.conn: conn}, "secrets": secrets})
        if self.extra_swanctl:
            text += "\n" + self.extra_swanctl.rstrip()
        return text + "\n"

    def _psk_hex(self) -> str:
        return "0x" + self.psk.encode().hex()

    def write_config(self) -> None:
        self.run_dir.mkdir(exist_ok=True)
        self.swanctl_dir.mkdir(exist_ok=True)
        for sub in SWANCTL_SUBDIRS:
            (self.swanctl_dir / sub).mkdir(exist_ok=True)
        for rel, data in self.files.items():
            (self.swanctl_dir / rel).write_bytes(data)
        self.strongswan_conf.write_text(self.strongswan_conf_text())
        self.swanctl_conf.write_text(self.swanctl_conf_text())

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> StrongSwan:
        """Write the config, start charon in the namespace, wait for vici, load the config."""
        if self.proc is not None:
            raise StrongSwanError("charon already started")
        self.write_config()
        script = f'mount --bind "{self.run_dir}" /run && exec "{self.charon_bin}"'
        cmd = self.ns.cmd("unshare", "-m", "--propagation", "private", "sh", "-c", script)
        env = {**os.environ, "STRONGSWAN_CONF": str(self.strongswan_conf)}
        with open(self.out_file, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.ns.procs.append(self.proc)  # safety net: netns_pair() stops it too if a test forgets
        try:
            self._wait_ready(timeout)
            self.load()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._fail(f"charon exited with status {self.proc.returncode} during startup")
            if self.socket.exists():
                res = self.swanctl("--stats", check=False, timeout=5)
                if res.returncode == 0:
                    return
                last = res.stdout + res.stderr
            time.sleep(0.1)
        self._fail(f"charon's vici socket {self.socket} not answering after {timeout}s", last)

    def load(self) -> str:
        """(Re)load swanctl.conf: connections and secrets."""
        res = self.swanctl("--load-all", "--file", str(self.swanctl_conf), check=False)
        if res.returncode != 0 or "loaded connection" not in res.stdout:
            self._fail("swanctl --load-all failed", res.stdout + res.stderr)
        return res.stdout

    def stop(self, timeout: float = 5.0) -> None:
        """Kill charon by PID (SIGTERM, then SIGKILL), keep its log in memory, remove the temp dir."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            with contextlib.suppress(ValueError):
                self.ns.procs.remove(proc)
        # The /run bind mount lived in charon's own mount namespace and died with it.
        if self._final_log is None and self.dir.exists():
            self._final_log = self._read_logs()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> StrongSwan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----------------------------------------------------------------------------------------- swanctl

    def swanctl(self, *args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``swanctl <command> [args] --uri <our socket>`` from the host (no namespace needed)."""
        cmd = [self.swanctl_bin, *args, "--uri", self.uri]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            self._fail(f"{' '.join(cmd)} timed out after {timeout}s", str(e.stdout or ""))
        if check and res.returncode != 0:
            self._fail(f"{' '.join(cmd)} exited {res.returncode}", res.stdout + res.stderr)
        return res

    def initiate(self, child: str | None = None, ike: str | None = None, timeout: int = 15) -> str:
        """Initiate ``child`` (default: our child) and wait for the result; raises with the log on failure."""
        args = ["--initiate", "--child", child or self.child, "--timeout", str(timeout)]
        if ike:
            args += ["--ike", ike]
        res = self.swanctl(*args, check=False, timeout=timeout + 5)
        if res.returncode != 0 or "initiate completed successfully" not in res.stdout:
            self._fail(f"initiate {child or self.child} failed (exit {res.returncode})", res.stdout + res.stderr)
        return res.stdout

    def terminate(
        self, ike: str | None = None, child: str | None = None, force: bool = False, timeout: int = 10
    ) -> str:
        """Terminate an IKE SA (by config name; default ours) or only a child SA."""
        args = ["--terminate", "--timeout", str(timeout)]
        args += ["--child", child] if child else ["--ike", ike or self.conn]
        if force:
            args.append("--force")
        return self.swanctl(*args, timeout=timeout + 5).stdout

    def rekey(self, ike: str | None = None, child: str | None = None, reauth: bool = False) -> str:
        args = ["--rekey"] + (["--child", child] if child else ["--ike", ike or self.conn])
        if reauth:
            args.append("--reauth")
        return self.swanctl(*args).stdout

    def list_sas_text(self) -> str:
        return self.swanctl("--list-sas", "--pretty", timeout=10).stdout

    def list_sas(self) -> list[IkeSA]:
        """Current IKE SAs with their child SAs, parsed from ``swanctl --list-sas --pretty``."""
        return sas_from_pretty(self.list_sas_text())

    def established(self, ike: str | None = None, child: str | None = None) -> tuple[IkeSA, ChildSA] | None:
        """The first ESTABLISHED IKE SA ``ike`` that has an INSTALLED child ``child``, if any."""
        ike, child = ike or self.conn, child or self.child
        for sa in self.list_sas():
            if sa.name != ike or sa.state != "ESTABLISHED":
                continue
            c = sa.child(child)
            if c is not None and c.state == "INSTALLED":
                return sa, c
        return None

    def wait_established(
        self, timeout: float = 15.0, ike: str | None = None, child: str | None = None
    ) -> tuple[IkeSA, ChildSA]:
        """Poll (every 0.2 s, bounded by ``timeout``) until ``established()`` finds the SAs."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                self._fail("charon is not running")
            found = self.established(ike, child)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        self._fail(
            f"no ESTABLISHED IKE SA {ike or self.conn} with INSTALLED child {child or self.child} after {timeout}s",
            self.list_sas_text(),
        )

    # ----------------------------------------------------------------------------------------- logs

    def _read_logs(self) -> str:
        parts = []
        for path in (self.out_file, self.log_file):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text.strip():
                    parts.append(text)
        return "\n".join(parts)

    def logs(self) -> str:
        """charon's output (stdout/stderr, then charon.log); still available after ``stop()``."""
        return self._final_log if self._final_log is not None else self._read_logs()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def _fail(self, what: str, output: str = "") -> NoReturn:
        msg = f"strongSwan in {self.ns.name}: {what}"
        if output.strip():
            msg += f"\n--- output ---\n{output.strip()[-4000:]}"
        msg += f"\n--- tail of charon log ({self.log_file}) ---\n{self.log_tail()}"
        raise StrongSwanError(msg)


@contextlib.contextmanager
def strongswan(ns: Netns, **kw: Any) -> Iterator[StrongSwan]:
    """``with strongswan(pair.a, local=..., remote=..., psk=...) as sw:`` -- started, loaded, always stopped."""
    sw = StrongSwan(ns, **kw)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()
