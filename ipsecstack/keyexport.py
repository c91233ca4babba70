"""Human-readable CLI listings and the Wireshark key export (``ipsecstack keys --wireshark DIR``).

Wireshark/tshark decrypt captures with two UAT tables in a profile directory: ``esp_sa`` (one line
per ESP SA: protocol, source, destination, SPI, encryption algorithm and key, authentication
algorithm and key) and ``ikev2_decryption_table`` (one line per IKE SA: SPIs, SK_ei, SK_er, the
encryption algorithm, SK_ai, SK_ar, the integrity algorithm). The algorithm names are Wireshark's
own labels. Point tshark at the directory with ``-o esp.enable_encryption_decode:TRUE`` and
``-C``/``--profile`` or pass the lines with ``-o uat:esp_sa:...``. AH SAs get no line: AH does
not encrypt, so Wireshark dissects it without keys.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

_ESP_ENCR = {
    "aes128gcm16": "AES-GCM with 16 octet ICV [RFC4106]",
    "aes192gcm16": "AES-GCM with 16 octet ICV [RFC4106]",
    "aes256gcm16": "AES-GCM with 16 octet ICV [RFC4106]",
    "aes128": "AES-CBC [RFC3602]",
    "aes192": "AES-CBC [RFC3602]",
    "aes256": "AES-CBC [RFC3602]",
    "null": "NULL",
}
_ESP_INTEG = {
    "sha256": "HMAC-SHA-256-128 [RFC4868]",
    "sha384": "HMAC-SHA-384-192 [RFC4868]",
    "sha512": "HMAC-SHA-512-256 [RFC4868]",
}
_IKE_ENCR = {
    "aes128gcm16": "AES-GCM-128 with 16 octet ICV [RFC5282]",
    "aes192gcm16": "AES-GCM-192 with 16 octet ICV [RFC5282]",
    "aes256gcm16": "AES-GCM-256 with 16 octet ICV [RFC5282]",
    "aes128": "AES-CBC-128 [RFC3602]",
    "aes192": "AES-CBC-192 [RFC3602]",
    "aes256": "AES-CBC-256 [RFC3602]",
}
_IKE_INTEG = {
    None: "NONE [RFC4306]",
    "sha256": "HMAC_SHA2_256_128 [RFC4868]",
    "sha384": "HMAC_SHA2_384_192 [RFC4868]",
    "sha512": "HMAC_SHA2_512_256 [RFC4868]",
}
_KEY_LEN = {"aes128": 16, "aes192": 24, "aes256": 32, "null": 0}


def esp_lines(esp: list[dict[str, Any]]) -> list[str]:
    lines = []
    for sa in esp:
        if sa["protocol"] != "esp":
            continue  # AH (RFC 4302) is not encrypted: nothing to decrypt, no esp_sa line
        if sa["src"] is None or sa["dst"] is None:
            continue  # transport-mode SAs without recorded endpoints: Wireshark matches by SPI with wildcards
        parts = sa["transform"].split("-")
        encr, integ = parts[0], (parts[1] if len(parts) > 1 else None)
        if encr not in _ESP_ENCR:
            continue  # Wireshark 4.0 has no ChaCha20-Poly1305 ESP decryption; a line it rejects voids the table
        key = bytes.fromhex(sa["key"])
        if integ is None:  # AEAD: key || salt, exactly as Wireshark wants it
            ekey, ikey, iname = key, b"", "NULL"
        else:
            n = _KEY_LEN[encr]
            ekey, ikey, iname = key[:n], key[n:], _ESP_INTEG[integ]
        fam = "IPv6" if ipaddress.ip_address(sa["src"]).version == 6 else "IPv4"
        fields = [fam, sa["src"], sa["dst"], f"0x{sa['spi']:08x}", _ESP_ENCR[encr], "0x" + ekey.hex(), iname,
                  "0x" + ikey.hex() if ikey else ""]  # fmt: skip
        lines.append(",".join(f'"{f}"' for f in fields))
    return lines


def ike_lines(ike: list[dict[str, Any]]) -> list[str]:
    lines = []
    for sa in ike:
        if sa["encr"] not in _IKE_ENCR:
            continue  # Wireshark 4.0 cannot decrypt ChaCha20-Poly1305 IKE messages
        # UAT syntax: byte fields are bare hex, text fields are quoted
        lines.append(",".join([sa["spi_i"], sa["spi_r"], sa["sk_ei"], sa["sk_er"], f'"{_IKE_ENCR[sa["encr"]]}"',
                               sa["sk_ai"], sa["sk_ar"], f'"{_IKE_INTEG[sa["integ"]]}"']))  # fmt: skip
    return lines


def write_wireshark(keys: dict[str, Any], directory: str) -> list[str]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = []
    for name, lines in (("esp_sa", esp_lines(keys["esp"])), ("ikev2_decryption_table", ike_lines(keys["ike"]))):
        p = d / name
        p.write_text("".join(line + "\n" for line in lines))
        p.chmod(0o600)
        out.append(str(p))
    return out


def _nat_text(e: dict[str, Any]) -> str:
    """strongSwan's words: what NAT detection found (nat-local, nat-remote) and forced encapsulation (nat-fake)."""
    found = [w for k, w in (("nat_local", "nat-local"), ("nat_remote", "nat-remote"), ("encap_forced", "nat-fake"))
             if e.get(k)]  # fmt: skip
    return f" ({', '.join(found)}, ESP in UDP)" if found else ""


def render(command: str, result: Any) -> str:
    """Plain-text listing of a control-socket answer."""
    if command == "status":
        drops = result.get("drops") or {}
        lines = [f"uptime {result.get('uptime')} s, SAs {result.get('sas')}, packets out {result.get('out_packets')} "
                 f"in {result.get('in_packets')}"]  # fmt: skip
        lines.append("drops: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"))
        if "datapath" in result:
            lines.append(f"datapath: {result['datapath']}")
            for sa, why in sorted((result.get("python_sas") or {}).items()):
                lines.append(f"  SA {sa} runs on the Python engine: {why}")
        fwd = result.get("forwarder")
        if fwd:
            punts = fwd.get("punts") or {}
            lines.append(
                f"forwarder: {'running' if fwd.get('running') else 'stopped'}, engine threads carried out "
                f"{fwd.get('out_packets')} in {fwd.get('in_packets')}; asked Python about "
                + ", ".join(f"{k}={v}" for k, v in sorted(punts.items()))
                + f" (dropped for a full queue: {fwd.get('punt_dropped')})"
            )
        if "ike" in result:
            lines.append("ike: " + ", ".join(f"{k}={v}" for k, v in sorted(result["ike"].items())))
        return "\n".join(lines)
    if command == "list-conns":
        return (
            "\n".join(
                f"{c['name']}: {'UP' if c.get('up') else 'down'} ({c['kind']}"
                + (
                    f", {c['local']} -> {c['remote']}, children {', '.join(c['children'])}"
                    if c["kind"] == "ike"
                    else ""
                )
                + ")"
                for c in result
            )
            or "no connections"
        )
    if command == "list-sas":
        lines = []
        for e in result:
            if "children" not in e:
                for s in e.get("sas", []):
                    lines.append(f"manual {s['name']}: {s['direction']} {s['protocol']} spi {s['spi']} {s['mode']} "
                                 f"{s['transform']} {s['packets']} packets {s['bytes']} bytes")  # fmt: skip
                continue
            lines.append(f"{e['name']}: {e['state']}, {e['proposal']}, spi {e['spi_i']}_{e['spi_r']}, peer "
                         f"{e['remote']}:{e['remote_port']}{_nat_text(e)}")  # fmt: skip
            if e.get("remote_id"):
                cert = f", certificate {e['remote_cert']!r}" if e.get("remote_cert") else ""
                lines.append(f"  {e['local_id']!r} === {e['remote_id']!r} (authenticated by {e['remote_auth']}{cert})")
            for c in e["children"]:
                lines.append(f"  {c['name']}: {c['mode']} {c.get('protocol', 'esp')} {c['transform']} in {c['spi_in']} "
                             f"out {c['spi_out']} "
                             f"{','.join(c['local_ts'])} === {','.join(c['remote_ts'])}; in {c['packets_in']} pkts "
                             f"{c['bytes_in']} B, out {c['packets_out']} pkts {c['bytes_out']} B")  # fmt: skip
        return "\n".join(lines) or "no SAs"
    if command == "keys":
        return f"{len(result['esp'])} ESP SAs, {len(result['ike'])} IKE SAs (use --json or --wireshark DIR)"
    return str(result)
