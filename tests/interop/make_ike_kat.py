"""Regenerate tests/vectors/data/strongswan_ikev2_kat.json: IKEv2 key derivation as strongSwan computes it.

Two charons (strongSwan, not ipsecstack) negotiate in two namespaces with ``ike`` logging at level 4,
where charon dumps the DH shared secret, SKEYSEED, every SK_* key, the AUTH octets (which contain the
whole IKE_SA_INIT messages, hence the nonces and SPIs) and the AUTH values. The values are extracted
from the initiator's log and written as JSON, so ``tests/vectors/test_ike_kat.py`` can check that
ipsecstack derives exactly the same keys from the same inputs: known answers from an independent
implementation. Needs root and strongSwan::

    sudo PYTHONPATH=. python3 tests/interop/make_ike_kat.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.interop import strongswan as sw  # noqa: E402
from tests.netns import nsutil  # noqa: E402

OUT = REPO / "tests" / "vectors" / "data" / "strongswan_ikev2_kat.json"
SUITES = [
    ("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
    ("aes256-sha384-prfsha384-ecp384", "aes256-sha384"),
    ("aes128-sha256-prfsha256-modp2048", "aes128-sha256"),
]
PSK = "strongswan-kat-psk-0123456789"
_HEAD = re.compile(r"\] <[^>]*> (.+?) => (\d+) bytes @")
_ROW = re.compile(r"\] <[^>]*>\s+(\d+): ((?:[0-9A-F]{2} ){1,16})")


def dumps(log: str) -> list[tuple[str, bytes]]:
    """Every ``label => N bytes`` hexdump in a charon log, in order."""
    out: list[tuple[str, bytes]] = []
    label, want, buf = None, 0, bytearray()
    for line in log.splitlines():
        m = _HEAD.search(line)
        if m:
            if label is not None and len(buf) == want:
                out.append((label, bytes(buf)))
            label, want, buf = m.group(1), int(m.group(2)), bytearray()
            continue
        r = _ROW.search(line)
        if r and label is not None and len(buf) < want:
            buf += bytes.fromhex(r.group(2).replace(" ", ""))
    if label is not None and len(buf) == want:
        out.append((label, bytes(buf)))
    return out


def one(ike: str, esp: str) -> dict[str, object]:
    with nsutil.netns_pair("kt") as pair:
        common = dict(psk=PSK, conn="c", child="c", ike_proposals=ike, esp_proposals=esp,
                      log_levels={"ike": 4})  # fmt: skip
        with sw.strongswan(pair.a, local=pair.addr_a, remote=pair.addr_b, **common) as a, \
                sw.strongswan(pair.b, local=pair.addr_b, remote=pair.addr_a, **common):  # fmt: skip
            a.initiate("c")
            a.wait_established(timeout=15)
            log = a.logs()
    got = dumps(log)

    def first(label: str) -> bytes:
        return next(v for k, v in got if k == label)

    octets = [v for k, v in got if k.startswith("octets = ")]
    auths = [v for k, v in got if k.startswith("AUTH = ")]
    return {
        "ike_proposal": ike,
        "psk": PSK,
        "shared": first("shared Diffie Hellman secret").hex(),
        "skeyseed": first("SKEYSEED").hex(),
        **{k.lower(): first(f"{k} secret").hex() for k in ("Sk_d", "Sk_ei", "Sk_er", "Sk_pi", "Sk_pr")},
        **({"sk_ai": first("Sk_ai secret").hex(), "sk_ar": first("Sk_ar secret").hex()} if "gcm" not in ike else {}),
        "octets_i": octets[0].hex(),  # initiator's signed octets: IKE_SA_INIT request | Nr | prf(SK_pi, IDi')
        "auth_i": auths[0].hex(),
        "octets_r": octets[1].hex(),  # responder's: IKE_SA_INIT response | Ni | prf(SK_pr, IDr')
        "auth_r": auths[1].hex(),
    }


def main() -> int:
    vectors = [one(ike, esp) for ike, esp in SUITES]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"source": "strongSwan 5.9 charon, ike log level 4", "vectors": vectors}, indent=1))
    print(f"wrote {len(vectors)} vectors to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
