"""The ``ipsecstack`` command line."""

from __future__ import annotations

import argparse
import sys

from ipsecstack import __version__
from ipsecstack.crypto.registry import ENCR, INTEG


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipsecstack", description="A userspace IPsec stack (IKEv2, ESP, AH).")
    p.add_argument("--version", action="version", version=f"ipsecstack {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("selfcheck", "protect and unprotect traffic between two manually keyed peers and report"),
        ("demo", "the demo (for now the datapath self-check; IKEv2 comes with the control plane)"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--proposal", default="aes128gcm16", help="ESP transform, e.g. aes256gcm16, aes128-sha256")
        c.add_argument("--mode", choices=("tunnel", "transport"), default="tunnel")
        c.add_argument("--packets", type=int, default=200, help="packets each way (default 200)")
    sub.add_parser("transforms", help="list the ESP/AH transforms this build supports")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("selfcheck", "demo"):
        from ipsecstack import selfcheck
        from ipsecstack.errors import ConfigError

        try:
            return selfcheck.run(args.proposal, args.mode, count=max(2, args.packets))
        except ConfigError as e:
            print(f"ipsecstack: {e}", file=sys.stderr)
            return 2
    if args.command == "transforms":
        print("ESP encryption: " + ", ".join(ENCR))
        print("ESP/AH integrity: " + ", ".join(INTEG))
        print("ESP transforms are written encryption-integrity (aes256-sha256) or an AEAD alone (aes128gcm16).")
        return 0
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
