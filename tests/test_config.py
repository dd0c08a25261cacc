"""knockd_fast.config: defaults, and one-line errors naming file and key for every fault."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import types
from pathlib import Path

import pytest

from knock_client.keys import write_key_file
from knock_client.protocol import KnockLayout, Proto
from knockd_fast.config import (
    RESTART_ONLY,
    ConfigError,
    LimitSettings,
    User,
    load_config,
    reloaded,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "config-example.toml"

MINIMAL_USER = """
[[users]]
id = 7
name = "alice"
key_file = "alice.key"
allow = ["22/tcp"]
"""


@pytest.fixture
def conf(tmp_path: Path):
    """write(text) -> path of a config.toml in tmp_path, next to keys alice.key, bob.key."""
    keys = {}
    for name in ("alice", "bob"):
        keys[name] = secrets.token_bytes(64)
        write_key_file(tmp_path / f"{name}.key", keys[name])

    def write(text: str, capture: str = '[capture]\ninterface = "eth0"\n') -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text + "\n" + capture)
        return path

    write.keys = keys  # type: ignore[attr-defined]
    write.dir = tmp_path  # type: ignore[attr-defined]
    return write


def error_of(path: Path, load_keys: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, load_keys=load_keys)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: "), text
    return text


# --- defaults -------------------------------------------------------------------------


def test_every_default(conf) -> None:
    path = conf(MINIMAL_USER)
    config = load_config(path)
    assert config.path == path
    assert config.knock.layout == KnockLayout(20000, 8, 62201)
    assert config.knock.modes == frozenset({"syn", "udp", "spa"})
    assert config.knock.knock_timeout == 10.0 and isinstance(config.knock.knock_timeout, float)
    assert config.knock.window == 30
    assert config.knock.group_by == "address+port"  # the default: a blind spoofer must guess
    assert config.capture.interfaces == ("eth0",)
    assert config.capture.label == "eth0"
    assert config.capture.destinations == ()
    assert config.capture.table_size == 65536
    assert config.capture.buffer_bytes == 33554432
    assert config.grants.default_timeout == 300
    assert config.grants.max_timeout == 3600
    assert config.grants.backend == "iptables"
    assert config.grants.chain == "KNOCKD-FAST"
    assert config.grants.hooks == ("INPUT",)
    assert config.state_dir == Path("/var/lib/knockd-fast")
    assert isinstance(config.users, types.MappingProxyType)
    alice = config.users[7]
    assert alice.name == "alice"
    assert alice.key == conf.keys["alice"]
    assert alice.key_file == conf.dir / "alice.key"
    assert alice.allow == frozenset({(22, "tcp")})
    assert alice.source_prefix == {4: 32, 6: 128}
    assert config.limits == LimitSettings(max_grants=16, max_knocks_per_minute=30)
    assert (alice.max_grants, alice.max_knocks_per_minute) == (16, 30)


def test_example_config_has_the_defaults(tmp_path: Path) -> None:
    config = load_config(EXAMPLE, load_keys=False)
    assert config.knock.layout == KnockLayout()
    assert config.knock.modes == frozenset({"syn", "udp", "spa"})
    assert (config.knock.knock_timeout, config.knock.window) == (10.0, 30)
    assert config.capture.interfaces == ("eth0",)
    assert config.capture.destinations == ()
    assert (config.capture.table_size, config.capture.buffer_bytes) == (65536, 33554432)
    assert config.grants.default_timeout == 300 and config.grants.max_timeout == 3600
    assert (config.grants.backend, config.grants.chain) == ("iptables", "KNOCKD-FAST")
    assert config.grants.hooks == ("INPUT",)
    assert (config.grants.ipset_name, config.grants.ipset_maxelem) == ("knockd-fast", 65536)
    assert config.state_dir == Path("/var/lib/knockd-fast")
    assert config.users[7].key_file == EXAMPLE.parent / "keys" / "alice.key"
    assert config.users[7].allow == {(22, "tcp"), (443, "tcp"), (51820, "udp")}
    assert config.users[7].source_prefix == {4: 32, 6: 128}
    assert config.users[8].source_prefix == {4: 24, 6: 56}
    assert config.users[8].key_file == Path("/etc/knockd-fast/keys/bob.key")
    assert config.users[7].key == b""
    assert config.limits == LimitSettings(16, 30)
    assert (config.users[7].max_grants, config.users[7].max_knocks_per_minute) == (16, 30)
    assert (config.users[8].max_grants, config.users[8].max_knocks_per_minute) == (4, 30)


def test_every_key_set(conf) -> None:
    path = conf(
        """
[knock]
base_port = 30000
digit_bits = 4
spa_port = 40000
modes = ["spa"]
knock_timeout = 2.5
window = 3600
group_by = "address"
[capture]
interface = "any"
destinations = ["192.0.2.1", "2001:db8::1"]
table_size = 1
buffer_bytes = 65536
[grants]
default_timeout = 60
max_timeout = 60
backend = "dry-run"
chain = "kf_2"
hooks = ["FORWARD", "INPUT"]
[limits]
max_grants = 1
max_knocks_per_minute = 60000
[state]
directory = "state"
[[users]]
id = 0
name = "alice"
key_file = "alice.key"
allow = ["53/udp", "22", "443/TCP"]
source = "any"
[[users]]
id = 4095
name = "bob"
key_file = "BOB"
allow = []
source = 56
max_grants = 65536
max_knocks_per_minute = 1
""".replace("BOB", str(conf.dir / "bob.key")),
        capture="",
    )
    config = load_config(path)
    assert config.knock.layout == KnockLayout(30000, 4, 40000)
    assert config.knock.modes == {"spa"} and not config.knock.knock_mode
    assert config.knock.knock_timeout == 2.5 and config.knock.window == 3600
    assert config.knock.group_by == "address"
    assert config.capture.interfaces == ("any",)
    assert config.capture.destinations == (
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("2001:db8::1"),
    )
    assert (config.capture.table_size, config.capture.buffer_bytes) == (1, 65536)
    assert config.grants.hooks == ("FORWARD", "INPUT")
    assert config.state_dir == conf.dir / "state"
    alice, bob = config.users[0], config.users[4095]
    assert alice.allow == {(53, "udp"), (22, "tcp"), (443, "tcp")}
    assert alice.source_prefix is None
    assert bob.key == conf.keys["bob"] and bob.allow == frozenset()
    assert bob.source_prefix == {4: 32, 6: 56}
    assert config.limits == LimitSettings(max_grants=1, max_knocks_per_minute=60000)
    assert (alice.max_grants, alice.max_knocks_per_minute) == (1, 60000)  # [limits]'s
    assert (bob.max_grants, bob.max_knocks_per_minute) == (65536, 1)  # its own


def test_a_user_sets_one_cap_and_takes_the_other_from_limits(conf) -> None:
    config = load_config(
        conf("[limits]\nmax_knocks_per_minute = 5\n" + MINIMAL_USER + BOB + "max_grants = 2\n")
    )
    alice, bob = config.users[7], config.users[8]
    assert (alice.max_grants, alice.max_knocks_per_minute) == (16, 5)
    assert (bob.max_grants, bob.max_knocks_per_minute) == (2, 5)


def test_source_table_form_and_missing_family_stays_exact(conf) -> None:
    config = load_config(conf(MINIMAL_USER + "source = { ipv4 = 24 }\n"))
    assert config.users[7].source_prefix == {4: 24, 6: 128}
    config = load_config(conf(MINIMAL_USER + "source = { ipv4 = 0, ipv6 = 56 }\n"))
    assert config.users[7].source_prefix == {4: 0, 6: 56}
    config = load_config(conf(MINIMAL_USER + "source = 24\n"))
    assert config.users[7].source_prefix == {4: 24, 6: 24}


def test_key_is_not_in_repr(conf) -> None:
    user = load_config(conf(MINIMAL_USER)).users[7]
    assert conf.keys["alice"].hex() not in repr(user)
    assert repr(conf.keys["alice"]) not in repr(user)


def test_config_is_frozen(conf) -> None:
    config = load_config(conf(MINIMAL_USER))
    with pytest.raises(AttributeError):
        config.knock = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users[8] = config.users[7]  # type: ignore[index]


# --- User helpers -----------------------------------------------------------------------


def make_user(source_prefix: dict[int, int] | None) -> User:
    return User(1, "u", b"", Path("k"), frozenset({(22, "tcp"), (53, "udp")}), source_prefix)


def test_allows() -> None:
    user = make_user(None)
    assert user.allows(22, "tcp") and user.allows(22, Proto.TCP) and user.allows(53, Proto.UDP)
    assert not user.allows(22, "udp") and not user.allows(53, "tcp") and not user.allows(23, "tcp")


@pytest.mark.parametrize(
    ("prefix", "claimed", "actual", "expected"),
    [
        ({4: 32, 6: 128}, "192.0.2.9", "192.0.2.9", True),
        ({4: 32, 6: 128}, "192.0.2.9", "192.0.2.10", False),
        ({4: 32, 6: 128}, "2001:db8::1", "2001:db8::1", True),
        ({4: 32, 6: 128}, "2001:db8::1", "2001:db8::2", False),
        ({4: 24, 6: 128}, "192.0.2.9", "192.0.2.200", True),
        ({4: 24, 6: 128}, "192.0.2.9", "192.0.3.9", False),
        ({4: 0, 6: 0}, "192.0.2.9", "203.0.113.1", True),
        ({4: 0, 6: 0}, "192.0.2.9", "2001:db8::1", False),  # families must match
        ({4: 32, 6: 56}, "2001:db8:0:ff12::1", "2001:db8:0:ff00::2", True),
        ({4: 32, 6: 56}, "2001:db8:0:ff12::1", "2001:db8:0:fe00::1", False),
        ({4: 32, 6: 128}, "::ffff:192.0.2.9", "192.0.2.9", False),
        (None, "192.0.2.9", "2001:db8::1", True),  # "any": no check at all
    ],
)
def test_source_matches(prefix, claimed, actual, expected) -> None:
    user = make_user(prefix)
    assert (
        user.source_matches(ipaddress.ip_address(claimed), ipaddress.ip_address(actual)) is expected
    )


# --- errors: one line, file and key -----------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    text = error_of(tmp_path / "nope.toml")
    assert text.endswith("not found")


def test_bad_toml_names_file_and_parser_message(conf) -> None:
    text = error_of(conf(MINIMAL_USER + "oops = \n"))
    assert "not valid TOML" in text and "line" in text


def test_not_utf8(conf) -> None:
    path = conf(MINIMAL_USER)
    path.write_bytes(b'[capture]\ninterface = "\xff"\n')
    assert "not valid TOML" in error_of(path)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[bogus]\nx = 1\n", "bogus", "unknown table"),
        ("[knock]\nbase_prot = 1\n", "knock.base_prot", "unknown key"),
        ("[grants]\ntimeout = 1\n", "grants.timeout", "unknown key"),
        ("[state]\ndir = 'x'\n", "state.dir", "unknown key"),
        (
            "[[users]]\nid = 1\nname = 'b'\nkey_file = 'b'\nallow = []\nport = 22\n",
            "users[1].port",
            "unknown key",
        ),
        ("[knock]\nbase_port = '20000'\n", "knock.base_port", "expected an integer, got string"),
        ("[knock]\ndigit_bits = 8.0\n", "knock.digit_bits", "expected an integer, got float"),
        ("[knock]\nwindow = true\n", "knock.window", "expected an integer, got boolean"),
        ("[knock]\nwindow = 0\n", "knock.window", "outside 1..3600"),
        ("[knock]\nwindow = 3601\n", "knock.window", "outside 1..3600"),
        ("[knock]\nwindow = 30.5\n", "knock.window", "expected an integer"),
        ("[knock]\nknock_timeout = 0\n", "knock.knock_timeout", "at least 0.1"),
        ("[knock]\nknock_timeout = 1e-300\n", "knock.knock_timeout", "at least 0.1"),
        ("[knock]\nknock_timeout = 0.09\n", "knock.knock_timeout", "at least 0.1"),
        ("[knock]\ngroup_by = 'port'\n", "knock.group_by", "'port' is not one of 'address+port'"),
        ("[knock]\ngroup_by = 1\n", "knock.group_by", "expected a string"),
        ("[knock]\nknock_timeout = nan\n", "knock.knock_timeout", "at least 0.1"),
        ("[knock]\nknock_timeout = '10'\n", "knock.knock_timeout", "expected seconds"),
        ("[knock]\nmodes = ['syn', 'tcp']\n", "knock.modes[1]", "'tcp' is not one of"),
        ("[knock]\nmodes = []\n", "knock.modes", "at least one"),
        ("[knock]\nmodes = ['spa', 'spa']\n", "knock.modes[1]", "listed twice"),
        ("[knock]\nmodes = 'spa'\n", "knock.modes", "expected an array"),
        ("[knock]\nmodes = [1]\n", "knock.modes[0]", "expected a string, got integer"),
        ("knock = 1\n", "knock", "expected a table"),
        ("[capture]\ntable_size = 0\n", "capture.table_size", "outside 1..16777216"),
        ("[capture]\ntable_size = 2147483647\n", "capture.table_size", "outside 1..16777216"),
        ("[capture]\ntable_size = 16777217\n", "capture.table_size", "outside"),
        ("[capture]\nbuffer_bytes = -1\n", "capture.buffer_bytes", "outside"),
        ("[capture]\ndestinations = ['192.0.2.300']\n", "capture.destinations[0]", "not an IP"),
        ("[capture]\ndestinations = ['192.0.2.0/24']\n", "capture.destinations[0]", "not an IP"),
        (
            "[capture]\ndestinations = ['192.0.2.1', '192.0.2.1']\n",
            "capture.destinations[1]",
            "listed twice",
        ),
        ("[capture]\ninterface = 'a/b'\n", "capture.interface", "not a network interface"),
        ("[capture]\ninterface = 'sixteen-chars-xx'\n", "capture.interface", "not a network"),
        ("[capture]\ninterface = ''\n", "capture.interface", "must not be empty"),
        (
            "[capture]\ninterface = 3\n",
            "capture.interface",
            "expected a string or an array of strings, got integer",
        ),
        ("[grants]\nmax_timeout = 299\n", "grants.max_timeout", "less than grants.default"),
        ("[grants]\ndefault_timeout = 0\n", "grants.default_timeout", "outside 1.."),
        ("[grants]\nbackend = 'nft'\n", "grants.backend", "'nft' is not one of"),
        ("[grants]\nchain = 'A' \n", None, None),  # valid: one character
        ("[grants]\nchain = 'has space'\n", "grants.chain", "1..28 characters"),
        ("[grants]\nchain = '" + "C" * 29 + "'\n", "grants.chain", "1..28 characters"),
        ("[grants]\nchain = 'INPUT'\n", "grants.chain", "is a built-in chain"),
        ("[grants]\nchain = 'ACCEPT'\n", "grants.chain", "is a built-in chain"),
        ("[grants]\nhooks = ['OUTPUT']\n", "grants.hooks[0]", "'OUTPUT' is not one of"),
        ("[grants]\nhooks = []\n", "grants.hooks", "at least one"),
        ("[grants]\nbackend = 'ipset'\nipset_maxelem = 1\n", None, None),
        (
            "[grants]\nbackend = 'ipset'\nipset_maxelem = 0\n",
            "grants.ipset_maxelem",
            "0 is outside",
        ),
        (
            "[grants]\nbackend = 'ipset'\nipset_name = ''\n",
            "grants.ipset_name",
            "must not be empty",
        ),
        (
            "[grants]\nbackend = 'ipset'\nipset_name = '" + "n" * 25 + "'\n",
            "grants.ipset_name",
            "1..24",
        ),
        ("[grants]\nbackend = 'ipset'\nipset_name = 'a b'\n", "grants.ipset_name", "1..24 char"),
        ("[grants]\nipset_maxelem = 10\n", "grants.ipset_maxelem", 'only for backend "ipset"'),
        ("[state]\ndirectory = 1\n", "state.directory", "expected a string"),
        ("[limits]\nmax_grant = 1\n", "limits.max_grant", "unknown key (known: max_grants, "),
        ("limits = 16\n", "limits", "expected a table"),
        ("[limits]\nmax_grants = 0\n", "limits.max_grants", "0 is outside 1..65536"),
        ("[limits]\nmax_grants = 65537\n", "limits.max_grants", "outside 1..65536"),
        ("[limits]\nmax_grants = '16'\n", "limits.max_grants", "expected an integer, got str"),
        ("[limits]\nmax_grants = 1.5\n", "limits.max_grants", "expected an integer, got float"),
        ("[limits]\nmax_knocks_per_minute = 0\n", "limits.max_knocks_per_minute", "outside 1"),
        (
            "[limits]\nmax_knocks_per_minute = 60001\n",
            "limits.max_knocks_per_minute",
            "60001 is outside 1..60000",
        ),
        ("[limits]\nmax_knocks_per_minute = true\n", "limits.max_knocks_per_minute", "boolean"),
    ],
)
def test_field_errors(conf, text: str, key: str | None, words: str | None) -> None:
    # The [capture] table of the fixture is replaced when the case writes its own.
    capture = "" if text.startswith("[capture]") else '[capture]\ninterface = "eth0"\n'
    if text.startswith("[capture]") and "interface" not in text:
        text = text.replace("[capture]\n", '[capture]\ninterface = "eth0"\n')
    path = conf(MINIMAL_USER + text if text.startswith("[[") else text + MINIMAL_USER, capture)
    if key is None:
        load_config(path)
        return
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"eth0"', ("eth0",)),
        ('["eth0"]', ("eth0",)),
        ('["veth-a", "veth-b"]', ("veth-a", "veth-b")),
        ('["eth1", "eth0", "wg0"]', ("eth1", "eth0", "wg0")),  # order kept
        ('["any"]', ("any",)),
        ('"any"', ("any",)),
        ('["' + "x" * 15 + '", "eth0"]', ("x" * 15, "eth0")),
    ],
)
def test_interface_string_or_list(conf, value: str, expected: tuple[str, ...]) -> None:
    config = load_config(conf(MINIMAL_USER, capture=f"[capture]\ninterface = {value}\n"))
    assert config.capture.interfaces == expected
    assert config.capture.label == ", ".join(expected)


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        ("[]", "capture.interface", "an empty array; name at least one interface"),
        ('["eth0", "eth0"]', "capture.interface[1]", "'eth0' is listed twice"),
        ('["eth0", "eth1", "eth0"]', "capture.interface[2]", "'eth0' is listed twice"),
        (
            '["any", "eth0"]',
            "capture.interface",
            '"any" already captures on every interface; list it alone or not at all',
        ),
        (
            '["eth0", "any"]',
            "capture.interface",
            '"any" already captures on every interface; list it alone or not at all',
        ),
        ('["any", "any"]', "capture.interface[1]", "'any' is listed twice"),
        ('["eth0", "a/b"]', "capture.interface[1]", "'a/b' is not a network interface name"),
        ('["eth0", "a:1"]', "capture.interface[1]", "'a:1' is not a network interface name"),
        ('["eth 0"]', "capture.interface[0]", "'eth 0' is not a network interface name"),
        ('[".."]', "capture.interface[0]", "'..' is not a network interface name"),
        (
            '["eth0", "' + "x" * 16 + '"]',
            "capture.interface[1]",
            f"{'x' * 16!r} is not a network interface name",
        ),
        ('["eth0", ""]', "capture.interface[1]", "must not be empty"),
        ('["eth0", 3]', "capture.interface[1]", "expected a string, got integer 3"),
        ('[["eth0"]]', "capture.interface[0]", "expected a string, got array"),
        (
            "{ name = 'eth0' }",
            "capture.interface",
            "expected a string or an array of strings, got table",
        ),
        (
            "true",
            "capture.interface",
            "expected a string or an array of strings, got boolean True",
        ),
    ],
)
def test_interface_list_errors(conf, value: str, key: str, reason: str) -> None:
    path = conf(MINIMAL_USER, capture=f"[capture]\ninterface = {value}\n")
    assert error_of(path) == f"{path}: {key}: {reason}"
    assert error_of(path, load_keys=False) == f"{path}: {key}: {reason}"


def test_example_config_list_form_loads(tmp_path: Path) -> None:
    # The commented list form of the example is valid as written.
    text = EXAMPLE.read_text()
    listed = '# interface = ["eth0", "eth1"]'
    assert listed in text
    path = tmp_path / "config.toml"
    path.write_text(
        text.replace('interface = "eth0"\n', "").replace(listed, listed.removeprefix("# "))
    )
    config = load_config(path, load_keys=False)
    assert config.capture.interfaces == ("eth0", "eth1")


def test_interface_is_required(conf) -> None:
    path = conf(MINIMAL_USER, capture="")
    assert error_of(path) == f"{path}: capture.interface: missing (required)"


def test_no_users(conf) -> None:
    path = conf("")
    assert error_of(path).startswith(f"{path}: users: no [[users]] entries")
    path = conf("users = []\n")
    assert error_of(path).startswith(f"{path}: users: no [[users]] entries")
    path = conf("[users]\nid = 1\n")
    assert error_of(path).startswith(f"{path}: users: expected [[users]] tables")


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("", "users[1].id", "missing (required)"),
        ("id = 4096", "users[1].id", "outside 0..4095"),
        ("id = -1", "users[1].id", "outside 0..4095"),
        (
            "id = 7\nname = 'bob'\nkey_file = 'bob.key'\nallow = []",
            "users[1].id",
            "already used by user 'alice'",
        ),
        (
            "id = 8\nname = 'alice'\nkey_file = 'bob.key'\nallow = []",
            "users[1].name",
            "already used by user id 7",
        ),
        ("id = 8\nname = ''", "users[1].name", "must not be empty"),
        (
            "id = 8\nname = \"a\\tb\"\nkey_file = 'bob.key'\nallow = []",
            "users[1].name",
            "unprintable",
        ),
        (
            "id = 8\nname = '" + "b" * 65 + "'\nkey_file = 'bob.key'\nallow = []",
            "users[1].name",
            "longer than 64 characters",
        ),
        ("id = 8\nname = 'bob'", "users[1].key_file", "missing (required)"),
        ("id = 8\nname = 'bob'\nkey_file = 'bob.key'", "users[1].allow", "missing (required)"),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['22/sctp']",
            "users[1].allow[0]",
            "protocol must be tcp or udp",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['0/tcp']",
            "users[1].allow[0]",
            "port must be a number in 1..65535",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['65536']",
            "users[1].allow[0]",
            "1..65535",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['٢٢/tcp']",
            "users[1].allow[0]",
            "port must be a number",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['ssh']",
            "users[1].allow[0]",
            "bad port spec",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = [22]",
            "users[1].allow[0]",
            "expected a string, got integer",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = []\nmax_grants = 0",
            "users[1].max_grants",
            "0 is outside 1..65536",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = []\nmax_knocks_per_minute = -1",
            "users[1].max_knocks_per_minute",
            "-1 is outside 1..60000",
        ),
        (
            "id = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = []\nmax_grant = 3",
            "users[1].max_grant",
            "unknown key",
        ),
    ],
)
def test_user_errors(conf, extra: str, key: str, words: str) -> None:
    path = conf(MINIMAL_USER + "[[users]]\n" + extra + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message


BOB = "[[users]]\nid = 8\nname = 'bob'\nkey_file = 'bob.key'\nallow = ['22/tcp']\n"


@pytest.mark.parametrize(
    ("source", "key", "words"),
    [
        ("'exactly'", "users[1].source", 'expected "exact", "any"'),
        ("true", "users[1].source", "got boolean"),
        ("24.0", "users[1].source", "got float"),
        ("129", "users[1].source", "prefix length 129 is outside 0..128"),
        ("-1", "users[1].source", "outside 0..128"),
        ("{ ipv4 = 33 }", "users[1].source.ipv4", "outside 0..32"),
        ("{ ipv6 = 129 }", "users[1].source.ipv6", "outside 0..128"),
        ("{ ipv6 = '56' }", "users[1].source.ipv6", "expected a prefix length, got string"),
        ("{ ipv5 = 1 }", "users[1].source.ipv5", "unknown key"),
        ("{}", "users[1].source", "empty table"),
        ("['exact']", "users[1].source", "got array"),
    ],
)
def test_bad_source(conf, source: str, key: str, words: str) -> None:
    path = conf(MINIMAL_USER + BOB + f"source = {source}\n")
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message, message


# --- key files ---------------------------------------------------------------------------


def test_missing_key_file(conf) -> None:
    path = conf(MINIMAL_USER + BOB.replace("bob.key", "carol.key"))
    assert error_of(path) == (
        f"{path}: users[1].key_file: key file {conf.dir / 'carol.key'}: not found"
    )


def test_missing_key_file_ignored_without_load_keys(conf) -> None:
    path = conf(MINIMAL_USER + BOB.replace("bob.key", "carol.key"))
    config = load_config(path, load_keys=False)
    assert config.users[8].key == b"" and config.users[8].key_file == conf.dir / "carol.key"


def test_short_key(conf) -> None:
    write_key_file(conf.dir / "short.key", b"\x01" * 32)
    (conf.dir / "short.key").write_text("AAEC\n")
    path = conf(MINIMAL_USER + BOB.replace("bob.key", "short.key"))
    message = error_of(path)
    assert message.startswith(f"{path}: users[1].key_file: key file {conf.dir / 'short.key'}: ")
    assert "holds 3 bytes; a key has 32 or 64" in message


def test_not_base64_key(conf) -> None:
    key_path = conf.dir / "bob.key"
    key_path.write_text("not a key!\n")
    message = error_of(conf(MINIMAL_USER + BOB))
    assert "users[1].key_file: " in message and "not a base64 key" in message


def test_world_readable_key(conf) -> None:
    os.chmod(conf.dir / "bob.key", 0o644)
    path = conf(MINIMAL_USER + BOB)
    message = error_of(path)
    assert message.startswith(f"{path}: users[1].key_file: key file {conf.dir / 'bob.key'}: ")
    assert "readable or writable by group or others (mode 0644)" in message
    assert "chmod 600" in message


def test_key_file_is_a_directory(conf) -> None:
    (conf.dir / "dir.key").mkdir()
    message = error_of(conf(MINIMAL_USER + BOB.replace("bob.key", "dir.key")))
    assert "users[1].key_file: " in message and "not a regular file" in message


def test_relative_key_file_is_relative_to_the_config_directory(conf, tmp_path, monkeypatch):
    sub = tmp_path / "etc"
    (sub / "keys").mkdir(parents=True)
    key = secrets.token_bytes(32)
    write_key_file(sub / "keys" / "a.key", key)
    config_path = sub / "knockd.toml"
    config_path.write_text(
        '[capture]\ninterface = "lo"\n[state]\ndirectory = "st"\n'
        + MINIMAL_USER.replace("alice.key", "keys/a.key")
    )
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = load_config(Path("etc/knockd.toml"))
    assert config.users[7].key == key
    assert config.users[7].key_file == sub / "keys" / "a.key"
    assert config.state_dir == sub / "st"
    assert config.path == config_path


# --- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knock", "words"),
    [
        ("base_port = 60000", "past 65535"),  # IPv4 alone would not fit either
        (
            "base_port = 54000\nspa_port = 1",
            "knock range for IPv6 messages",
        ),  # IPv4 fits, IPv6 does not
        ("digit_bits = 11\nbase_port = 1", "IPv6 messages (34 segments"),  # never fits for IPv6
        ("digit_bits = 3", "digit_bits 3 is outside 4..12"),
        ("digit_bits = 13", "digit_bits 13 is outside 4..12"),
        ("base_port = 0", "base_port 0 is outside 1..65535"),
        ("spa_port = 65536", "spa_port 65536 is outside 1..65535"),
        ("spa_port = 20000", "spa_port 20000 lies inside the knock range"),
        ("spa_port = 31775", "spa_port 31775 lies inside the knock range 20000-31775 for IPv6"),
    ],
)
def test_layout_that_does_not_fit(conf, knock: str, words: str) -> None:
    path = conf(f"[knock]\n{knock}\n" + MINIMAL_USER)
    message = error_of(path)
    assert message.startswith(f"{path}: knock: "), message
    assert words in message, message


@pytest.mark.parametrize("spa_port", [19999, 31776, 1, 65535])
def test_spa_port_just_outside_both_ranges(conf, spa_port: int) -> None:
    config = load_config(conf(f"[knock]\nspa_port = {spa_port}\n" + MINIMAL_USER))
    assert config.knock.layout.spa_port == spa_port


def test_layout_that_only_just_fits(conf) -> None:
    # IPv6 at 8 bits: 46 segments of 256 ports = 11776; 65536 - 11776 = 53760.
    config = load_config(conf("[knock]\nbase_port = 53760\nspa_port = 1\n" + MINIMAL_USER))
    assert config.knock.layout.port_range(46).stop - 1 == 65535


# --- strict modes (sshd's StrictModes) ----------------------------------------------------


def test_a_config_others_can_write_is_refused(conf) -> None:
    path = conf(MINIMAL_USER)
    os.chmod(path, 0o666)
    assert error_of(path) == f"{path}: {path} is writable by group or others (mode 0666)"


def test_a_config_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    write_key_file(shared / "alice.key", secrets.token_bytes(64))
    path = shared / "config.toml"
    path.write_text(MINIMAL_USER + '[capture]\ninterface = "eth0"\n')
    os.chmod(shared, 0o777)  # anyone may replace config.toml
    assert f"directory {shared} is writable by group or others (mode 0777)" in error_of(path)
    os.chmod(shared, 0o1777)  # sticky, as /tmp: nobody may replace another's file
    assert load_config(path).users[7].name == "alice"


def test_a_key_or_state_directory_others_can_write_is_refused(conf) -> None:
    path = conf(MINIMAL_USER + '[state]\ndirectory = "state"\n')
    (conf.dir / "state").mkdir(mode=0o700)
    os.chmod(conf.dir / "state", 0o770)
    assert error_of(path).startswith(f"{path}: state.directory: directory {conf.dir / 'state'} ")
    os.chmod(conf.dir / "state", 0o700)
    key = conf.dir / "alice.key"
    os.chmod(key, 0o600)
    link = conf.dir / "elsewhere"
    link.mkdir(mode=0o777)
    os.chmod(link, 0o777)
    (link / "alice.key").symlink_to(key)  # a safe key behind a link others can replace
    path.write_text(path.read_text().replace('"alice.key"', '"elsewhere/alice.key"'))
    assert f"users[0].key_file: directory {link} is writable" in error_of(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_key_owned_by_another_user_is_refused(conf) -> None:
    path = conf(MINIMAL_USER)
    os.chown(conf.dir / "alice.key", 65534, -1)  # nobody
    assert error_of(path).endswith("alice.key is owned by uid 65534, not uid 0")
    # Without loading keys (check-config as a user who may not read them) it is not read.
    assert load_config(path, load_keys=False).users[7].name == "alice"


def test_a_reload_runs_on_the_started_restart_only_settings_and_the_files_others(
    tmp_path: Path,
) -> None:
    """``reloaded``: each RESTART_ONLY setting as it runs, every other as the file says; a
    setting missing from RESTART_ONLY or from the effective config's make-up fails here."""
    key = tmp_path / "a.key"
    write_key_file(key, bytes(64))
    for name in ("p1", "p2", "k1.pem", "k2.pem", "ca1.pem", "ca2.pem", "c1.pem", "c2.pem"):
        (tmp_path / name).write_text("secret\n")
        os.chmod(tmp_path / name, 0o600)
    running_text = (
        "[knock]\nbase_port = 20000\ndigit_bits = 8\nspa_port = 62201\nwindow = 30\n"
        'knock_timeout = 10\ngroup_by = "address+port"\nmodes = ["syn", "spa"]\n'
        '[capture]\ninterface = "eth0"\ntable_size = 1024\nbuffer_bytes = 1048576\n'
        '[grants]\nbackend = "ipset"\ndefault_timeout = 60\nmax_timeout = 600\n'
        'chain = "KF"\nhooks = ["INPUT"]\nipset_name = "kfa"\nipset_maxelem = 1024\n'
        f'[state]\ndirectory = "{tmp_path / "s1"}"\n'
        '[metrics]\nlisten = "127.0.0.1:9477"\n'
        '[fleet]\nurl = "rediss://192.0.2.9:6379/0"\ngateway = "gw1"\nkey_file = "a.key"\n'
        'username = "k1"\npassword_file = "p1"\ntls_ca_file = "ca1.pem"\n'
        'tls_cert_file = "c1.pem"\ntls_key_file = "k1.pem"\non_unavailable = "local"\n'
        '[[users]]\nid = 1\nname = "a"\nkey_file = "a.key"\nallow = ["22/tcp"]\n'
    )
    file_text = (
        "[knock]\nbase_port = 21000\ndigit_bits = 10\nspa_port = 62202\nwindow = 45\n"
        'knock_timeout = 20\ngroup_by = "address"\nmodes = ["spa"]\n'
        '[capture]\ninterface = ["eth1"]\ndestinations = ["192.0.2.1"]\ntable_size = 2048\n'
        "buffer_bytes = 2097152\n"
        '[grants]\nbackend = "ipset"\ndefault_timeout = 90\nmax_timeout = 900\n'
        'chain = "KG"\nhooks = ["INPUT", "FORWARD"]\nipset_name = "kfb"\n'
        "ipset_maxelem = 2048\n"
        f'[state]\ndirectory = "{tmp_path / "s2"}"\n'
        "[limits]\nmax_grants = 3\n"
        '[metrics]\nlisten = "[::1]:9478"\ntextfile = "k.prom"\n'
        '[fleet]\nurl = "rediss://198.51.100.9:6380/1"\ngateway = "gw2"\n'
        'key_file = "b.key"\nusername = "k2"\npassword_file = "p2"\n'
        'tls_ca_file = "ca2.pem"\ntls_cert_file = "c2.pem"\ntls_key_file = "k2.pem"\n'
        'on_unavailable = "refuse"\n'
        '[[users]]\nid = 2\nname = "b"\nkey_file = "a.key"\nallow = ["23/tcp"]\n'
    )
    write_key_file(tmp_path / "b.key", bytes(32))
    (tmp_path / "run.toml").write_text(running_text)
    (tmp_path / "file.toml").write_text(file_text)
    running, fresh = load_config(tmp_path / "run.toml"), load_config(tmp_path / "file.toml")
    effective, pending = reloaded(running, fresh)
    for key, get in RESTART_ONLY:
        assert get(effective) == get(running), key
    changed = {line.split(" ", 1)[0] for line in pending}
    assert changed == {key for key, _ in RESTART_ONLY} - {"grants.backend", "grants.protect",
        "grants.nft_table", "grants.nft_priority", "grants.nft_sets_only"}  # fmt: skip
    assert "knock.digit_bits 8 -> 10" in pending
    assert "capture.interface [eth0] -> [eth1]" in pending
    # Everything else is the file's.
    assert (effective.path, effective.users, effective.limits) == (
        fresh.path, fresh.users, fresh.limits)  # fmt: skip
    assert (effective.knock.window, effective.knock.modes) == (45, fresh.knock.modes)
    assert (effective.grants.default_timeout, effective.grants.max_timeout) == (90, 900)
    assert "metrics.listen 127.0.0.1:9477 -> [::1]:9478" in pending
    assert effective.metrics.textfile == tmp_path / "k.prom"
    assert "fleet.gateway gw1 -> gw2" in pending
    assert (effective.fleet.on_unavailable, effective.fleet.key) == ("refuse", bytes(64))
    assert reloaded(effective, fresh)[1] == pending, "still named at the next reload"
    assert reloaded(running, running) == (running, [])


# --- [metrics] ------------------------------------------------------------------------


def test_metrics_default_to_no_endpoint_and_no_textfile(conf) -> None:
    """A port-knocking host opens no port for its metrics unless told to."""
    metrics = load_config(conf(MINIMAL_USER)).metrics
    assert (metrics.listen, metrics.textfile, metrics.listen_text) == (None, None, "")


@pytest.mark.parametrize(
    ("text", "address", "port"),
    [("127.0.0.1:9477", "127.0.0.1", 9477), ("[::1]:1", "::1", 1), ("[2001:db8::1]:65535",
     "2001:db8::1", 65535), ("0.0.0.0:9477", "0.0.0.0", 9477)],
)  # fmt: skip
def test_metrics_listen_takes_an_address_and_a_port(conf, text, address, port) -> None:
    metrics = load_config(conf(f'[metrics]\nlisten = "{text}"\ntextfile = "m/k.prom"\n'
                               + MINIMAL_USER)).metrics  # fmt: skip
    assert metrics.listen == (ipaddress.ip_address(address), port)
    assert metrics.listen_text == text
    assert metrics.textfile == conf.dir / "m" / "k.prom"  # relative to the file, as key_file


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('"localhost:9477"', "is not ADDRESS:PORT with an IP address"),
        ('"127.0.0.1"', "the port must be 1..65535"),
        ('"127.0.0.1:0"', "the port must be 1..65535"),
        ('"127.0.0.1:65536"', "the port must be 1..65535"),
        ('"127.0.0.1:-1"', "the port must be 1..65535"),
        ('"::1:9477"', "put an IPv6 address in brackets"),
        ('":9477"', "is not ADDRESS:PORT"),
        ("9477", "expected a string, got integer 9477"),
    ],
)
def test_a_bad_metrics_listen_names_the_key(conf, value, reason) -> None:
    text = error_of(conf(f"[metrics]\nlisten = {value}\n" + MINIMAL_USER))
    assert ": metrics.listen: " in text and reason in text, text


def test_an_unknown_metrics_key_is_an_error(conf) -> None:
    text = error_of(conf("[metrics]\nport = 9477\n" + MINIMAL_USER))
    assert "metrics.port: unknown key (known: listen, textfile)" in text


# --- [fleet] --------------------------------------------------------------------------


def fleet_config(conf, **keys: str) -> Path:
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    return conf("[fleet]\n" + lines + MINIMAL_USER)


@pytest.mark.parametrize(
    "url",
    ["redis://192.0.2.9:6379/0", "rediss://redis.example.org:6380", "redis://[2001:db8::9]/1"],
)
def test_a_fleet_url_names_host_port_and_database(conf, url: str) -> None:
    assert load_config(fleet_config(conf, url=url, key_file="bob.key")).fleet.url == url


def test_no_fleet_by_default_nor_with_an_empty_url(conf) -> None:
    assert not load_config(conf(MINIMAL_USER)).fleet.enabled
    assert not load_config(fleet_config(conf, url="", on_unavailable="refuse")).fleet.enabled


def test_a_fleet_reads_its_key_and_password_and_names_the_gateway_after_the_host(conf) -> None:
    password = conf.dir / "redis.pass"
    password.write_text("s3cret password\n")
    password.chmod(0o600)
    path = fleet_config(
        conf, url="redis://192.0.2.9:6379/0", key_file="bob.key", password_file="redis.pass"
    )
    fleet = load_config(path).fleet
    assert fleet.enabled and fleet.gateway == socket.gethostname()
    assert (fleet.key, fleet.password) == (conf.keys["bob"], "s3cret password")
    assert (fleet.on_unavailable, fleet.username) == ("local", "")
    assert "s3cret" not in repr(fleet) and conf.keys["bob"].hex() not in repr(fleet)
    assert load_config(path, load_keys=False).fleet.key == b""  # check-config as anyone


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"url": "http://192.0.2.9"}, "is not redis://HOST:PORT/DB (or rediss:// for TLS)"),
        ({"url": "redis://:pw@192.0.2.9:6379/0"}, "put them in fleet.username and"),
        ({"url": "rediss://192.0.2.9/0?ssl_cert_reqs=none"}, "with no options"),
        ({"url": "redis://192.0.2.9:6379/0#x"}, "with no options"),
        ({"url": "redis://192.0.2.9:6379/0"}, "fleet.key_file: missing (required with a url)"),
        ({"key_file": "bob.key", "gateway": "gw 1"}, "fleet.gateway: gateway name 'gw 1'"),
        ({"key_file": "bob.key", "tls_ca_file": "bob.key"}, "set, but the url is not rediss://"),
        ({"key_file": "nope.key"}, "fleet.key_file: key file"),
        ({"key_file": "bob.key", "password_file": "loose.pass"}, "readable or writable by group"),
        ({"key_file": "bob.key", "on_unavailable": "wait"}, "'wait' is not one of 'local'"),
        ({"key_file": "bob.key", "port": "6379"}, "fleet.port: unknown key"),
    ],
)
def test_a_fleet_misconfigured_is_one_line_naming_the_key(conf, keys, message) -> None:
    loose = conf.dir / "loose.pass"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    keys = {"url": "redis://192.0.2.9:6379/0", **keys}
    assert message in error_of(fleet_config(conf, **keys))


def test_tls_files_must_be_there_and_the_client_key_private(conf) -> None:
    ca, cert, key = (conf.dir / name for name in ("ca.pem", "c.pem", "c.key"))
    for path in (ca, cert, key):
        path.write_text("PEM\n")
    key.chmod(0o644)
    tls = {"url": "rediss://192.0.2.9:6380/0", "key_file": "bob.key", "tls_ca_file": "ca.pem"}
    assert load_config(fleet_config(conf, **tls)).fleet.tls_ca_file == ca
    both = {**tls, "tls_cert_file": "c.pem", "tls_key_file": "c.key"}
    assert "fleet.tls_key_file: key file" in error_of(fleet_config(conf, **both))
    key.chmod(0o600)
    assert load_config(fleet_config(conf, **both)).fleet.tls_key_file == key
    assert "needs its key too" in error_of(fleet_config(conf, **{**tls, "tls_cert_file": "c.pem"}))
    assert "missing.pem: No such file" in error_of(
        fleet_config(conf, **{**tls, "tls_ca_file": "missing.pem"})
    )
