#!/usr/bin/env bash
# A two-gateway IKEv2 tunnel on a real kernel, in two network namespaces this script creates and
# removes (root; run 'bash deploy/setup.sh test' once first so the venv and tools exist).
#   gw-a (172.31.250.1, LAN 10.1.0.1/16)  <-- veth -->  gw-b (172.31.250.2, LAN 10.2.0.1/16)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# names unique to this run (two runs at once never touch each other's); veth names fit in 15 characters
A=ipsdemo-a-$$ B=ipsdemo-b-$$ VA=ipsd$$a VB=ipsd$$b
tmp=$(mktemp -d)
pids=()
made=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done  # only what this run created
    rm -rf "$tmp"
}
trap cleanup EXIT
echo "namespaces: $A $B"
for ns in $A $B; do
    ip netns add "$ns"
    made+=("$ns")
done
ip link add $VA type veth peer name $VB
ip link set $VA netns $A
ip link set $VB netns $B
ip -n $A addr add 172.31.250.1/24 dev $VA
ip -n $A link set $VA up
ip -n $A link set lo up
ip -n $B addr add 172.31.250.2/24 dev $VB
ip -n $B link set $VB up
ip -n $B link set lo up
conf() {  # name local remote tun lnet rnet start
    cat > "$tmp/$1.toml" <<EOT
[agent]
inner_backend = "tun"
outer_backend = "udp"
tun_addrs = ["$4"]
control_socket = "$tmp/$1.sock"

[connections.site]
local_addrs = ["$2"]
remote_addrs = ["$3"]
proposals = ["aes128gcm16-prfsha256-x25519"]

[connections.site.children.net]
local_ts = ["$5"]
remote_ts = ["$6"]
start_action = "$7"

[secrets.ike.site]
secret = "netns demo secret"
EOT
}
conf a 172.31.250.1 172.31.250.2 10.1.0.1/16 10.1.0.0/16 10.2.0.0/16 start
conf b 172.31.250.2 172.31.250.1 10.2.0.1/16 10.2.0.0/16 10.1.0.0/16 none
ip netns exec $B env PYTHONPATH=. "$PY" -m ipsecstack run -c "$tmp/b.toml" & pids+=($!)
sleep 1
ip netns exec $A env PYTHONPATH=. "$PY" -m ipsecstack run -c "$tmp/a.toml" & pids+=($!)
for _ in $(seq 50); do [ -S "$tmp/a.sock" ] && break; sleep 0.2; done
sleep 2
"$PY" -m ipsecstack list-sas --socket "$tmp/a.sock"
ip netns exec $A ping -c 3 -I 10.1.0.1 10.2.0.1
"$PY" -m ipsecstack status --socket "$tmp/a.sock"
