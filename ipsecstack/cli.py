"""The ``ipsecstack`` command line."""

from __future__ import annotations

import argparse
import sys

from ipsecstack import __version__
from ipsecstack.config import Config, load
from ipsecstack.crypto.registry import ENCR, INTEG
from ipsecstack.errors import ConfigError
from ipsecstack.runtime.control import DEFAULT_SOCKET


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipsecstack", description="A userspace IPsec stack (IKEv2, ESP, AH).")
    p.add_argument("--version", action="version", version=f"ipsecstack {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("bench", help="measure protect/unprotect on this machine against the bare cipher call",
                       description="A quick datapath benchmark; bench/ in the repository has the full matrix and "
                       "the backend (TUN, NFQUEUE, raw, UDP) benchmarks.")  # fmt: skip
    c.add_argument("--transform", default="aes128gcm16", help="ESP transform (default aes128gcm16)")
    c.add_argument("--size", type=int, default=1400, help="IP packet size in bytes (default 1400)")
    c.add_argument("--packets", type=int, default=20000, help="packets per run (default 20000)")
    c.add_argument("--scenario", metavar="LIST",
                   help="run the benchmark suite's scenarios instead (micro, backend, tunnel, flood, handshake, "
                   "compare, all; comma-separated): needs a checkout, runs bench/run.py with this and every further "
                   "option (see bench/run.py --help)")  # fmt: skip
    c = sub.add_parser("import-swanctl", help="convert a strongSwan swanctl.conf to an ipsecstack configuration",
                       description="Print the ipsecstack TOML for a swanctl.conf; what cannot be converted is listed "
                       "on stderr and in the output's header.")  # fmt: skip
    c.add_argument("file", help="swanctl.conf to convert")
    c = sub.add_parser("selfcheck", help="protect and unprotect traffic between two manually keyed peers")
    c.add_argument("--proposal", default="aes128gcm16", help="ESP transform, e.g. aes256gcm16, aes128-sha256")
    c.add_argument("--mode", choices=("tunnel", "transport"), default="tunnel")
    c.add_argument("--packets", type=int, default=200, help="packets each way (default 200)")
    c = sub.add_parser("demo", help="two peers in one process: IKEv2, then ESP traffic over in-memory links",
                       description="Two gateways negotiate with IKEv2 (PSK), then exchange ESP traffic.")  # fmt: skip
    c.add_argument("--proposal", default="aes128gcm16-prfsha256-x25519", help="IKE proposal (strongSwan syntax)")
    c.add_argument("--esp", default="aes128gcm16", help="ESP proposal, e.g. aes256-sha256, chacha20poly1305")
    c.add_argument("--mode", choices=("tunnel", "transport"), default="tunnel")
    c.add_argument("--packets", type=int, default=300, help="packets each way (default 300)")
    c.add_argument("--datapath", choices=("native", "python"), default=None,
                   help="the ESP engine (default: native where it was built, else python)")  # fmt: skip
    sub.add_parser("transforms", help="list the ESP/AH transforms this build supports")
    sub.add_parser("schema", help="print the configuration file's JSON Schema (for editors: taplo, Even Better TOML)",
                   description="The JSON Schema of the TOML configuration; deploy/ipsecstack.schema.json is a copy. "
                   "Point an editor at it with a '#:schema PATH' first line in the file.")  # fmt: skip
    for name, text in (
        ("run", "run the daemon in the foreground with the given configuration (SIGINT/SIGTERM stop it)"),
        ("check", "validate a configuration file and exit (0: valid, 2: invalid)"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration file")
    for name, text in (
        ("status", "a running daemon's counters, drops by reason and IKE statistics"),
        ("list-conns", "configured connections and whether each is up"),
        ("list-sas", "IKE and child SAs with algorithms, SPIs, traffic selectors, counters and rekey times"),
        ("initiate", "start a connection now"),
        ("terminate", "delete a connection's IKE SA (and its child SAs)"),
        ("keys", "export the current SA keys (for decrypting captures; handle the output as a secret)"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        where = c.add_mutually_exclusive_group()
        where.add_argument("-c", "--config", metavar="FILE", help="find the daemon's control socket from this config")
        where.add_argument("--socket", metavar="PATH", help=f"the control socket (default {DEFAULT_SOCKET})")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("initiate", "terminate"):
            c.add_argument("name", help="connection name ([connections.<name>])")
        if name == "keys":
            c.add_argument("--wireshark", metavar="DIR", help="write esp_sa and ikev2_decryption_table files here")
    return p


def _load(path: str) -> Config:
    import os

    return load(path, os.environ)


def _print_errors(path: str, error: ConfigError) -> None:
    """Every error in the file, one per line (key path, value, fix), then how many."""
    for e in error.errors:
        print(f"ipsecstack: {path}: {e}", file=sys.stderr)
    if len(error.errors) > 1:
        print(f"ipsecstack: {path}: {len(error.errors)} errors", file=sys.stderr)


def run_daemon(cfg: Config, path: str) -> int:
    """``ipsecstack run``: the daemon for a loaded ``cfg`` (read from ``path``, which SIGHUP re-reads) until a
    signal stops it; the exit status. Public so that a test can change the process (drop to an account,
    say) between loading the file and starting the daemon, as ``tests/netns/test_privdrop.py`` does."""
    import structlog

    from ipsecstack.agent import Reloader, attach_control, attach_ike, build_node, drop_privileges
    from ipsecstack.runtime import logs, privs
    from ipsecstack.runtime.io import BackendError
    from ipsecstack.runtime.loop import loop_name, run

    logs.configure(cfg.agent.log_format, cfg.agent.log_level)
    log = structlog.get_logger("ipsecstack")

    async def main() -> None:
        account = privs.preflight(cfg.agent.user) if cfg.agent.user else None  # before anything is opened
        node = build_node(cfg, log=log)
        try:
            ike = attach_ike(cfg, node, log=log, user=account)
            control = attach_control(cfg, node, ike, log=log)
            if account is not None:
                await drop_privileges(control, account, log)
        except BackendError:
            node.stop()
            raise
        node.on_reload = Reloader(path, cfg, node, ike, log)
        for key in cfg.notices:
            log.warning("configuration key has no effect yet", key=key)
        for w in cfg.warnings:  # never a secret: the value of a warning about one is "<secret>"
            log.warning("configuration warning", key=w.field, advice=w.fix)
        log.info(
            "agent starting", loop=loop_name(), inner=cfg.agent.inner_backend, outer=cfg.agent.outer_backend,
            connections=[c.name for c in cfg.manual] + [p.name for p in cfg.connections],
        )  # fmt: skip
        await node.run_until_signal()

    try:
        run(main())
    except BackendError as e:
        print(f"ipsecstack: {e}", file=sys.stderr)
        return 3
    return 0


CONTROL_COMMANDS = ("status", "list-conns", "list-sas", "initiate", "terminate", "keys")


def _control(args: argparse.Namespace) -> int:
    import json

    from ipsecstack.runtime.control import request

    path = args.socket or DEFAULT_SOCKET
    if args.config:
        try:
            path = _load(args.config).agent.control_socket
        except OSError as e:
            print(f"ipsecstack: {args.config}: {e}", file=sys.stderr)
            return 2
        except ConfigError as e:
            _print_errors(args.config, e)
            return 2
    extra = {"name": args.name} if args.command in ("initiate", "terminate") else {}
    try:
        answer = request(path, args.command, **extra)
    except OSError as e:
        print(f"ipsecstack: cannot reach the daemon at {path}: {e.strerror or e} (is 'ipsecstack run' running?)",
              file=sys.stderr)  # fmt: skip
        return 3
    if not answer.get("ok"):
        print(f"ipsecstack: {answer.get('error')}", file=sys.stderr)
        return 1
    result = answer["result"]
    if args.command == "keys" and args.wireshark:
        from ipsecstack.keyexport import write_wireshark

        files = write_wireshark(result, args.wireshark)
        print("wrote " + ", ".join(files) + " (secret key material: protect or delete these files)")
        return 0
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    from ipsecstack.keyexport import render

    print(render(args.command, result))
    return 0


def _bench_suite(scenario: str, extra: list[str]) -> int:
    """``ipsecstack bench --scenario ...``: the suite in bench/ of the checkout this package runs from."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    if not script.is_file():
        print(f"ipsecstack: --scenario runs the benchmark suite of a source checkout, and {script} does not exist "
              "(an installed package has only the quick benchmark: drop --scenario)", file=sys.stderr)  # fmt: skip
        return 2
    return subprocess.run([sys.executable, str(script), "--scenario", scenario, *extra], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench" and args.scenario is not None:
        return _bench_suite(args.scenario, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("selfcheck", "demo"):
        try:
            if args.command == "selfcheck":
                from ipsecstack import selfcheck

                return selfcheck.run(args.proposal, args.mode, count=max(2, args.packets))
            from ipsecstack import demo

            return demo.run(args.mode, args.proposal, args.esp, max(3, args.packets), datapath=args.datapath)
        except ConfigError as e:
            print(f"ipsecstack: {e}", file=sys.stderr)
            return 2
    if args.command in ("run", "check"):
        try:
            cfg = _load(args.config)
        except OSError as e:
            print(f"ipsecstack: cannot read {args.config}: {e.strerror}", file=sys.stderr)
            return 2
        except ConfigError as e:
            _print_errors(args.config, e)
            return 2
        if args.command == "check":
            for key in cfg.notices:
                print(f"{args.config}: note: {key} is accepted but has no effect yet", file=sys.stderr)
            for w in cfg.warnings:
                print(f"{args.config}: warning: {w}", file=sys.stderr)
            print(f"{args.config}: ok ({len(cfg.connections)} IKE connection(s), {len(cfg.manual)} manual)")
            return 0
        return run_daemon(cfg, args.config)
    if args.command == "bench":
        from ipsecstack import benchmark

        if not 64 <= args.size <= 9000 or not 100 <= args.packets <= 10_000_000:
            print("ipsecstack: --size must be 64..9000 and --packets 100..10000000", file=sys.stderr)
            return 2
        try:
            return benchmark.run(args.transform, args.size, args.packets)
        except ConfigError as e:
            print(f"ipsecstack: {e}", file=sys.stderr)
            return 2
    if args.command == "import-swanctl":
        from pathlib import Path

        from ipsecstack.swanctl_import import SwanctlSyntaxError, convert

        try:
            result = convert(Path(args.file).read_text())
        except OSError as e:
            print(f"ipsecstack: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 2
        except SwanctlSyntaxError as e:
            print(f"ipsecstack: {args.file}: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(result.toml)
        for item in result.skipped:
            print(f"ipsecstack: not converted: {item}", file=sys.stderr)
        return 0
    if args.command in CONTROL_COMMANDS:
        return _control(args)
    if args.command == "schema":
        import json

        from ipsecstack.config_schema import json_schema

        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    if args.command == "transforms":
        print("ESP encryption: " + ", ".join(ENCR))
        print("ESP/AH integrity: " + ", ".join(INTEG))
        print("ESP transforms are written encryption-integrity (aes256-sha256) or an AEAD alone (aes128gcm16).")
        return 0
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
