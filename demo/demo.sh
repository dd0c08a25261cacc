#!/usr/bin/env bash
# The main job, for now: a user makes a key, configures a profile and knocks (dry run),
# and the ports are decoded back as the server will. The daemon issue extends this to a
# real knock between two network namespaces.
set -euo pipefail

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_CONFIG_HOME="$work/config"   # never touch the real ~/.config/knock
mkdir -p "$XDG_CONFIG_HOME/knock"

step() { printf '\n== %s\n' "$*"; }

step "knock keygen --out key   (a 512-bit AES-SIV key, mode 0600)"
knock keygen --out "$XDG_CONFIG_HOME/knock/key"
ls -l "$XDG_CONFIG_HOME/knock/key"

step "a profile, so that 'knock open myserver 22/tcp' is all the user types"
cat > "$XDG_CONFIG_HOME/knock/config.toml" <<TOML
[profiles.myserver]
host = "192.0.2.10"        # documentation address: nothing is sent in this demo
user = 7
key_file = "$XDG_CONFIG_HOME/knock/key"
claimed_ip = "198.51.100.23"
TOML
cat "$XDG_CONFIG_HOME/knock/config.toml"

step "knock open myserver 22/tcp --dry-run   (the 34 destination ports, in send order)"
knock open myserver 22/tcp --dry-run | paste -sd' ' | fold -sw 100

step "knock open myserver 22/tcp --dry-run --json"
knock open myserver 22/tcp --dry-run --json > "$work/knock.json"
fold -w 100 "$work/knock.json"

step "the server's side: ports in any order -> message -> authenticated fields"
python3 - "$work/knock.json" "$XDG_CONFIG_HOME/knock/key" <<'PY'
import json, random, sys
from knock_client.keys import load_key
from knock_client.protocol import KnockLayout, open_message

knock = json.load(open(sys.argv[1]))
ports = knock["ports"]
random.shuffle(ports)
message = KnockLayout().message_from_ports(ports, len(bytes.fromhex(knock["message"])))
fields = open_message(message, load_key(sys.argv[2]))
print(f"rebuilt {len(message)}-byte message from {len(ports)} shuffled ports:", message.hex())
print(f"user {fields.user_id} asks to {fields.action} {fields.port}/{fields.proto} for "
      f"{fields.claimed_ip} (timestamp {fields.timestamp}, salt {fields.salt:#08x})")
PY

step "a bad key file is one clear line, not a traceback"
chmod 644 "$XDG_CONFIG_HOME/knock/key"
knock open myserver 22/tcp --dry-run || true
