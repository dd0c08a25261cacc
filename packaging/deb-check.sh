#!/usr/bin/env bash
# `make deb-check`: install the packages `make deb` built (in $1) with apt, check what they
# installed, run the demo on /usr/bin, and leave the host's packages as they were.
#
# Checked: /usr/bin/knockd-fast version (the extension built with Debian's cython3 loads
# and links libpcap); the unit runs /usr/bin/knockd-fast and is neither enabled nor
# started; the shipped /etc/knockd-fast/config.toml is refused until edited; check-config
# passes an edited copy; the capture, build and protocol-vector tests against the installed
# modules with Debian's python3, numpy and cryptography; demo/demo.sh with /usr/bin first.
#
# Cleanup (trap, also on failure): purge both packages, then purge exactly the packages
# the install pulled in (python3-iptables, python3-pytest, ...: the list before vs after),
# and reinstall Debian's knockd if python3-knock-client's Conflicts removed it. The demo
# works only in namespaces it makes; nothing here touches the host's firewall.
set -euo pipefail

debs=${1:?usage: deb-check.sh DIR-WITH-DEBS}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$debs"
daemon_deb=$(ls "$PWD"/knockd-fast_*.deb)
client_deb=$(ls "$PWD"/python3-knock-client_*.deb)
ours="knockd-fast python3-knock-client"

if [ "$(id -u)" -ne 0 ]; then
  echo "deb-check: needs root (apt, the demo's namespaces)" >&2
  exit 1
fi
for p in $ours; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    echo "deb-check: $p is already installed here; not touching it (purge it first)" >&2
    exit 1
  fi
done

installed() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 ~ /^.i/ {print $2}' | sort; }
before=$(mktemp); after=$(mktemp); work=$(mktemp -d)
installed > "$before"
knockd_was_installed=""
grep -qx knockd "$before" && knockd_was_installed=1
apt_() { DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 "$@"; }

cleanup() {
  status=$?
  set +e
  trap - EXIT
  step "cleanup: purge $ours and what their install pulled in"
  apt_ purge $ours > "$work/purge.log" 2>&1 || cat "$work/purge.log"
  installed > "$after"
  pulled=$(comm -13 "$before" "$after" | tr '\n' ' ')
  if [ -n "$pulled" ]; then
    echo "   purging: $pulled"
    apt_ purge $pulled > "$work/purge.log" 2>&1 || cat "$work/purge.log"
  fi
  if [ -n "$knockd_was_installed" ] && ! dpkg-query -W -f='${Status}' knockd 2>/dev/null \
      | grep -q "ok installed"; then
    echo "   reinstalling knockd (python3-knock-client conflicts with it: both have /usr/bin/knock)"
    apt_ install --no-install-recommends knockd > "$work/knockd.log" 2>&1 || cat "$work/knockd.log"
  fi
  installed > "$after"
  if cmp -s "$before" "$after"; then
    echo "   host packages as before"
  else
    echo "   host packages differ from before:"; diff "$before" "$after" | sed 's/^/   /'
    [ "$status" -ne 0 ] || status=1
  fi
  rm -rf "$work" "$before" "$after"
  [ "$status" -eq 0 ] && echo "deb-check: ok" || echo "deb-check: FAILED ($status)" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "deb-check: $*" >&2; exit 1; }

step "apt-get install ./$(basename "$daemon_deb") ./$(basename "$client_deb") (+ python3-pytest, python3-pyroute2 for the checks)"
apt_ install --no-install-recommends "$daemon_deb" "$client_deb" python3-pytest python3-pyroute2 \
  > "$work/install.log" 2>&1 \
  || { cat "$work/install.log"; fail "apt-get install failed"; }
grep -E "^(Setting up|Removing) " "$work/install.log" | sed 's/^/   /'
if grep -qE "^Setting up (gcc|cpp|build-essential|cython3|python3-dev|libpython3.*-dev)[ :]" \
    "$work/install.log"; then
  fail "the install pulled in a compiler or headers"
fi

step "the installed commands"
for cmd in knockd-fast knock; do
  [ "$(command -v "$cmd")" = "/usr/bin/$cmd" ] || fail "$cmd is $(command -v "$cmd"), not /usr/bin/$cmd"
done
/usr/bin/knockd-fast version | tee "$work/version"
grep -q "libpcap version" "$work/version" || fail "the capture extension did not load"
/usr/bin/knock --version

step "the unit: /usr/bin/knockd-fast, not enabled, not started"
unit=$(dpkg -L knockd-fast | grep '/systemd/system/knockd-fast.service$')
grep '^ExecStart=' "$unit" | sed 's/^/   /'
grep -q '^ExecStart=/usr/bin/knockd-fast run ' "$unit" || fail "$unit: ExecStart is not /usr/bin/knockd-fast"
if ls /etc/systemd/system/*.wants/knockd-fast.service >/dev/null 2>&1; then
  fail "the install enabled knockd-fast.service"
fi
if [ -d /run/systemd/system ] && systemctl is-active --quiet knockd-fast; then
  fail "the install started knockd-fast.service"
fi
echo "   enabled: no; started: no"
stat -c '   %A %U %n' /etc/knockd-fast/config.toml /etc/knockd-fast/keys

step "check-config: the shipped config is refused until edited (its users have no keys yet)"
set +e
/usr/bin/knockd-fast check-config -c /etc/knockd-fast/config.toml 2> "$work/refused"
code=$?
set -e
sed 's/^/   /' "$work/refused"
[ "$code" -eq 2 ] && grep -q key_file "$work/refused" \
  || fail "check-config on the shipped config: exit $code, expected 2 naming a key_file"

step "check-config: an edited copy (keys made by /usr/bin/knock keygen, interface lo)"
mkdir -p "$work/etc/keys"
knock keygen --out "$work/etc/keys/alice.key" > /dev/null
knock keygen --out "$work/etc/keys/bob.key" > /dev/null
sed -e 's|^interface = "eth0"|interface = "lo"|' \
    -e "s|/etc/knockd-fast/keys/bob.key|$work/etc/keys/bob.key|" \
    -e "s|^directory = \"/var/lib/knockd-fast\"|directory = \"$work/state\"|" \
    /usr/share/doc/knockd-fast/examples/config-example.toml > "$work/etc/config.toml"
/usr/bin/knockd-fast check-config -c "$work/etc/config.toml"

step "the ipset backend with Debian's python3-pyroute2 (0.7): a warning, and a one-line refusal"
sed -i 's|^backend = "iptables"|backend = "ipset"|' "$work/etc/config.toml"
/usr/bin/knockd-fast check-config -c "$work/etc/config.toml" 2>&1 | sed 's/^/   /' | tee "$work/ipset"
grep -q "grants.backend: the ipset backend needs pyroute2 >= 0.9.7, < 0.10 (0.7" "$work/ipset" \
  || fail "check-config did not warn of pyroute2 0.7"
set +e
/usr/bin/knockd-fast status -c "$work/etc/config.toml" > "$work/ipset" 2>&1
code=$?
set -e
sed 's/^/   /' "$work/ipset"
[ "$code" -eq 1 ] && [ "$(wc -l < "$work/ipset")" -eq 1 ] && grep -q "needs pyroute2" "$work/ipset" \
  || fail "status with the ipset backend: exit $code, expected 1 and one line naming pyroute2"

step "tests against the installed modules (Debian's python3, numpy, cryptography; cython3 build)"
/usr/bin/python3 -c 'import cryptography, numpy; print("   cryptography", cryptography.__version__, "numpy", numpy.__version__)'
# From a directory that does not hold the source packages: the installed ones are imported.
(cd "$work" && /usr/bin/python3 -m pytest -p no:cacheprovider -q --rootdir "$top" \
   "$top/tests/test_build.py" "$top/tests/test_capture.py" "$top/tests/test_protocol_vectors.py" \
   2>&1 | tail -4 | sed 's/^/   /'; exit "${PIPESTATUS[0]}")
/usr/bin/python3 -c 'import knockd_fast, knock_client; print("   imported from", knockd_fast.__file__, knock_client.__file__)' \
  | tee "$work/where"
grep -q "/usr/lib/python3/dist-packages/knockd_fast/" "$work/where" || fail "tests did not use the package"

step "demo/demo.sh on /usr/bin/knockd-fast and /usr/bin/knock"
bash "$top/demo/demo.sh" 2>&1 | tee "$work/demo.log" | sed 's/^/   | /'
grep -q "CONNECTED" "$work/demo.log" || fail "the demo never connected after knocking"
grep -q "rejected replay" "$work/demo.log" || fail "the demo's replay was not rejected"
