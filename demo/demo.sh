#!/usr/bin/env bash
# The main job, end to end: a server namespace runs knockd-fast with port 2222 dropped;
# a client namespace knocks with `knock`, connects, closes, and is shut out again.
# Everything lives in two network namespaces made here (tests/netns.py, the helper the
# tests use) and removed on exit, with every process in them: also on failure half-way,
# Ctrl-C or kill.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, libpcap, iptables)" >&2
  exit 1
fi

netns="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/netns.py"
tag="kfd$$"
work=$(mktemp -d)
hosts_made=""
daemon_pid=""
listener_pid=""

cleanup() {
  set +e  # every step runs, whatever failed before
  trap - INT TERM
  for pid in $daemon_pid $listener_pid; do kill "$pid" 2>/dev/null; done
  # Then whatever else still runs in them (a knock half-way), and the namespaces.
  [ -z "$hosts_made" ] || python3 "$netns" down "$tag"
  wait 2>/dev/null  # reap our children: none lingers as a zombie
  rm -rf "$work"
}
trap cleanup EXIT
# A signal ends the script through the EXIT trap (without these, bash would just die).
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Only in the foreground: in the background (`in_server ... &`) `$!` would be the subshell
# running the function, not the program (start programs directly there).
in_server() { ip netns exec "$server" "$@"; }
in_client() { ip netns exec "$client" "$@"; }

try_connect() {
  in_client python3 - <<'PY'
import socket
s = socket.socket()
s.settimeout(1.5)
try:
    s.connect(("192.0.2.1", 2222))
    print("   connect 192.0.2.1:2222 -> CONNECTED")
except OSError as error:
    print(f"   connect 192.0.2.1:2222 -> refused or dropped ({error})")
PY
}

step "two hosts: server 192.0.2.1 and client 192.0.2.2, joined by a veth pair"
# Set first: a signal during `up` is handled once it returns, and must find them. `up`
# refuses names that exist (not ours to empty) and removes what it made if it fails.
hosts_made=1
hosts=$(python3 "$netns" up "$tag") || { hosts_made=""; exit 1; }
eval "$hosts"  # server, client, server_if, client_if

step "the user makes a key; the admin configures user 7 (alice) with 2222/tcp"
knock keygen --out "$work/alice.key"
cat > "$work/config.toml" <<TOML
[knock]
window = 30

[capture]
interface = "$server_if"

[grants]
default_timeout = 60

[state]
directory = "$work/state"

[metrics]
listen = "127.0.0.1:9477"

[[users]]
id = 7
name = "alice"
key_file = "alice.key"
allow = ["2222/tcp"]
TOML
knockd-fast check-config -c "$work/config.toml"

step "server: knockd-fast run, then DROPs for 2222/tcp and the knock ports after its jump, and a listener"
# `ip netns exec` execs its command: `$!` is the daemon itself.
ip netns exec "$server" knockd-fast run -c "$work/config.toml" 2> "$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 50); do grep -q "^knockd-fast .* on " "$work/daemon.log" && break; sleep 0.1; done
sed 's/^/   daemon: /' "$work/daemon.log"
in_server iptables-legacy -A INPUT -p tcp --dport 2222 -j DROP
# The knock range and the SPA port stay silent: no RST betrays (or reflects) a knock.
for proto in tcp udp; do
  in_server iptables-legacy -A INPUT -p "$proto" --dport 20000:31775 -j DROP
done
in_server iptables-legacy -A INPUT -p udp --dport 62201 -j DROP
ip netns exec "$server" python3 -c "
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 2222))
s.listen()
while True:
    s.accept()[0].close()
" &
listener_pid=$!
sleep 0.3
in_server iptables-legacy -S INPUT | sed 's/^/   /'

step "client: a connection before knocking is dropped"
try_connect

step "client: knock open 192.0.2.1 2222/tcp  (34 TCP SYNs to closed ports)"
in_client knock open 192.0.2.1 2222/tcp --user 7 --key-file "$work/alice.key"
sleep 0.5
try_connect
in_server knockd-fast status -c "$work/config.toml" | sed 's/^/   status: /'

step "client: knock close 192.0.2.1 2222/tcp"
in_client knock close 192.0.2.1 2222/tcp --user 7 --key-file "$work/alice.key"
sleep 0.5
try_connect

step "an eavesdropper resends a captured knock: rejected as a replay"
in_client knock open 192.0.2.1 2222/tcp --user 7 --key-file "$work/alice.key" --mode spa --json \
  > "$work/spa.json"
sleep 0.3
in_client python3 - "$work/spa.json" <<'PY'
import json, socket, sys
sent = json.load(open(sys.argv[1]))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
    bytes.fromhex(sent["message"]), ("192.0.2.1", sent["ports"][0]))
PY
sleep 0.5

step "Prometheus: the daemon's metrics, served on 127.0.0.1:9477 inside the server only"
in_server python3 -c "
import urllib.request
text = urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=5).read().decode()
shown = ('knockd_fast_decisions_total', 'knockd_fast_grant_changes_total', 'knockd_fast_grants{',
         'knockd_fast_capture_packets_total', 'knockd_fast_completions_total',
         'knockd_fast_judging_latency_seconds_count', 'knockd_fast_capture_dropped_packets_total')
for line in text.splitlines():
    if line.startswith(shown) and not line.endswith(' 0.0'):
        print('  ', line)
"

step "the daemon's decisions (one line each)"
kill "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=""
sed 's/^/   /' "$work/daemon.log"
