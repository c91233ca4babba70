#!/bin/sh
# Writes fresh secrets for the example configurations into DIR (default: this directory):
#   rw.psk site-b.psk host-b.psk            pre-shared keys (IKE), 40 random base64 characters each
#   site-b.in.key site-b.out.key            manual ESP keys for aes256gcm16 (36 bytes: key + salt), hex
#   host-b.in.key host-b.out.key            manual ESP keys for aes128gcm16 (20 bytes: key + salt), hex
# The files shipped next to the examples were made with it and are public: they let
# `ipsecstack check -c deploy/examples/X.toml` pass from a clone, and must never protect real traffic.
# For a deployment: sh make-secrets.sh /etc/ipsecstack, then give the peer the same PSK, and the
# manual keys swapped (A's .in.key is B's .out.key).
set -eu
dir=${1:-$(dirname "$0")}
umask 077
random() {  # random $1 bytes as hex, or base64 with $2 = b64
    python3 -c 'import base64, secrets, sys
n = int(sys.argv[1]); raw = secrets.token_bytes(n)
print(base64.b64encode(raw).decode() if sys.argv[2:] == ["b64"] else raw.hex())' "$@"
}
for name in rw site-b host-b; do random 30 b64 > "$dir/$name.psk"; done
for end in in out; do
    random 36 > "$dir/site-b.$end.key"
    random 20 > "$dir/host-b.$end.key"
done
echo "wrote $dir/{rw,site-b,host-b}.psk, $dir/{site-b,host-b}.{in,out}.key"
