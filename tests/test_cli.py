"""The `knock` command as a user runs it: a subprocess, with a private HOME.

Nothing here sends a packet: knocks use --dry-run, which prints what would be sent.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from knock_client.protocol import (
    DEFAULT_BASE_PORT,
    DEFAULT_SPA_PORT,
    MESSAGE_LENGTHS,
    Action,
    Knock,
    KnockLayout,
    Proto,
    open_message,
)

Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def knock(knock_cmd: list[str], knock_env: dict[str, str], tmp_path: Path) -> Run:
    """``knock("open", ...)``: run the client, return the completed process (text)."""

    def run(*args: str | Path, umask: int | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*knock_cmd, *map(str, args)],
            env=knock_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=None if umask is None else lambda: os.umask(umask),
        )

    return run


@pytest.fixture
def config_dir(knock_env: dict[str, str]) -> Path:
    """$XDG_CONFIG_HOME/knock of the client subprocesses."""
    path = Path(knock_env["XDG_CONFIG_HOME"]) / "knock"
    path.mkdir(parents=True)
    return path


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def dry_run_ports(result: subprocess.CompletedProcess) -> list[int]:
    lines = ok(result).splitlines()
    assert all(re.fullmatch(r"\d+", line) for line in lines), lines
    return [int(line) for line in lines]


def opened(ports: list[int], layout: KnockLayout, family: int, key: bytes) -> Knock:
    """The knock a receiver with ``layout`` and ``key`` reads from ``ports``."""
    return open_message(layout.message_from_ports(ports, MESSAGE_LENGTHS[family]), key)


def assert_recent(timestamp: int) -> None:
    assert abs(time.time() - timestamp) < 10, f"timestamp {timestamp} is not now"


# --- keygen ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits_args, length", [([], 64), (["--bits", "512"], 64), (["--bits", "256"], 32)]
)
def test_keygen_prints_one_base64_key(knock: Run, bits_args: list[str], length: int) -> None:
    lines = ok(knock("keygen", *bits_args)).splitlines()
    assert len(lines) == 1
    assert len(base64.b64decode(lines[0], validate=True)) == length


def test_keygen_keys_differ(knock: Run) -> None:
    assert ok(knock("keygen")) != ok(knock("keygen"))


@pytest.mark.parametrize("umask", [0o022, 0], ids=["umask022", "umask0"])
def test_keygen_out_creates_a_private_file(knock: Run, tmp_path: Path, umask: int) -> None:
    path = tmp_path / "new.key"
    assert ok(knock("keygen", "--out", path, umask=umask)) == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 64


def test_keygen_out_refuses_to_overwrite(knock: Run, tmp_path: Path) -> None:
    path = tmp_path / "old.key"
    path.write_text("precious\n")
    result = knock("keygen", "--out", path)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "exists" in result.stderr and "Traceback" not in result.stderr
    assert path.read_text() == "precious\n"


def test_keygen_force_replaces_and_tightens_mode(knock: Run, tmp_path: Path) -> None:
    path = tmp_path / "old.key"
    path.write_text("precious\n")
    path.chmod(0o644)
    ok(knock("keygen", "--out", path, "--force", "--bits", "256"))
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_out_makes_the_missing_folders_private_on_a_fresh_account(
    knock: Run, knock_env: dict[str, str]
) -> None:
    config = Path(knock_env["XDG_CONFIG_HOME"])
    assert not config.exists()
    path = config / "knock" / "myserver.key"
    ok(knock("keygen", "--out", path, umask=0o022))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((config / "knock").stat().st_mode) == 0o700
    assert stat.S_IMODE(config.stat().st_mode) == 0o700


def test_keygen_out_into_a_folder_it_cannot_make_says_which(knock: Run, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = knock("keygen", "--out", tmp_path / "file" / "sub" / "x.key")
    assert result.returncode != 0 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot create its folder {tmp_path / 'file' / 'sub'}" in result.stderr


# --- open/close --dry-run -------------------------------------------------------------


@pytest.mark.parametrize(
    "host, digit_bits, count",
    [
        ("127.0.0.1", None, 34),
        ("::1", None, 46),
        ("127.0.0.1", 4, 68),
        ("127.0.0.1", 10, 28),
        ("::1", 4, 92),
        ("::1", 10, 37),
    ],
)
def test_dry_run_prints_one_port_per_segment(
    knock: Run, knock_key: tuple[Path, bytes], host: str, digit_bits: int | None, count: int
) -> None:
    key_path, key = knock_key
    extra = [] if digit_bits is None else ["--digit-bits", str(digit_bits)]
    ports = dry_run_ports(
        knock("open", host, "22/tcp", "--user", "7", "--key-file", key_path, "--dry-run", *extra)
    )
    layout = KnockLayout(digit_bits=digit_bits or 8)
    assert len(ports) == count
    assert all(
        DEFAULT_BASE_PORT <= p < DEFAULT_BASE_PORT + count * layout.segment_size for p in ports
    ), ports
    segments = sorted((p - DEFAULT_BASE_PORT) // layout.segment_size for p in ports)
    assert segments == list(range(count))
    knock_ = opened(ports, layout, ipaddress.ip_address(host).version, key)
    assert (knock_.action, knock_.port, knock_.proto, knock_.user_id) == (
        Action.OPEN,
        22,
        Proto.TCP,
        7,
    )
    assert knock_.claimed_ip == ipaddress.ip_address(host)
    assert knock_.duration == 0
    assert_recent(knock_.timestamp)


def test_dry_run_shuffles_unless_no_shuffle(knock: Run, knock_key: tuple[Path, bytes]) -> None:
    args = ("open", "127.0.0.1", "22/tcp", "--user", "7", "--key-file", knock_key[0], "--dry-run")
    in_order = dry_run_ports(knock(*args, "--no-shuffle"))
    assert len(in_order) == 34
    assert all(a < b for a, b in zip(in_order, in_order[1:], strict=False)), in_order
    shuffled = dry_run_ports(knock(*args))
    assert shuffled != sorted(shuffled)  # a sorted shuffle of 34 ports: odds 1 in 34!


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize(
    "spa_args, spa_port", [([], DEFAULT_SPA_PORT), (["--spa-port", "40000"], 40000)]
)
def test_spa_mode_prints_only_the_spa_port(
    knock: Run, knock_key: tuple[Path, bytes], host: str, spa_args: list[str], spa_port: int
) -> None:
    key_path, key = knock_key
    args = (
        "open",
        host,
        "22/tcp",
        "--user",
        "7",
        "--key-file",
        key_path,
        "--mode",
        "spa",
        "--dry-run",
        *spa_args,
    )
    assert dry_run_ports(knock(*args)) == [spa_port]
    report = json.loads(ok(knock(*args, "--json")))
    assert report["ports"] == [spa_port] and report["mode"] == "spa"
    message = bytes.fromhex(report["message"])
    assert len(message) == MESSAGE_LENGTHS[ipaddress.ip_address(host).version]
    assert open_message(message, key).claimed_ip == ipaddress.ip_address(host)


def test_json_report_matches_its_message(knock: Run, knock_key: tuple[Path, bytes]) -> None:
    key_path, key = knock_key
    lines = ok(
        knock(
            "open",
            "127.0.0.1",
            "22/tcp",
            "--user",
            "7",
            "--key-file",
            key_path,
            "--dry-run",
            "--json",
        )
    ).splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert {"message", "ports", "fields", "mode", "sent"} <= set(report)
    assert report["sent"] is False and report["mode"] == "syn"
    fields = report["fields"]
    assert set(fields) == {
        "action",
        "proto",
        "port",
        "timestamp",
        "claimed_ip",
        "user_id",
        "salt",
        "duration",
    }
    message = bytes.fromhex(report["message"])
    assert open_message(message, key).as_json() == fields
    assert (fields["action"], fields["proto"], fields["port"], fields["user_id"]) == (
        "open",
        "tcp",
        22,
        7,
    )
    assert fields["claimed_ip"] == "127.0.0.1" and fields["duration"] == 0
    assert_recent(fields["timestamp"])
    assert sorted(report["ports"]) == KnockLayout().ports_for(message)


def test_close_claimed_ip_duration_and_udp(knock: Run, knock_key: tuple[Path, bytes]) -> None:
    key_path, key = knock_key
    report = json.loads(
        ok(
            knock(
                "close",
                "127.0.0.1",
                "53/udp",
                "--user",
                "4095",
                "--key-file",
                key_path,
                "--claimed-ip",
                "192.0.2.10",
                "--duration",
                "600",
                "--dry-run",
                "--json",
            )
        )
    )
    knock_ = opened(report["ports"], KnockLayout(), 4, key)
    assert (knock_.action, knock_.proto, knock_.port, knock_.user_id, knock_.duration) == (
        Action.CLOSE,
        Proto.UDP,
        53,
        4095,
        600,
    )
    assert knock_.claimed_ip == ipaddress.ip_address("192.0.2.10")
    assert report["fields"]["claimed_ip"] == "192.0.2.10"


def test_bare_port_means_tcp(knock: Run, knock_key: tuple[Path, bytes]) -> None:
    report = json.loads(
        ok(
            knock(
                "open",
                "127.0.0.1",
                "443",
                "--user",
                "1",
                "--key-file",
                knock_key[0],
                "--dry-run",
                "--json",
            )
        )
    )
    assert (report["fields"]["port"], report["fields"]["proto"]) == (443, "tcp")


# --- profiles -------------------------------------------------------------------------


def write_myserver(config_dir: Path, key_path: Path, extra: str = "") -> None:
    (config_dir / "config.toml").write_text(
        f'{extra}[profiles.myserver]\nhost = "127.0.0.1"\nuser = 7\nkey_file = "{key_path}"\n'
        "base_port = 30000\ndigit_bits = 4\n"
    )


def test_profile_named_like_host(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    key_path, key = knock_key
    write_myserver(config_dir, key_path)
    report = json.loads(ok(knock("open", "myserver", "22/tcp", "--dry-run", "--json")))
    assert report["address"] == "127.0.0.1"
    assert len(report["ports"]) == 68 and all(30000 <= p < 30000 + 68 * 16 for p in report["ports"])
    knock_ = opened(report["ports"], KnockLayout(30000, 4), 4, key)
    assert (knock_.user_id, knock_.port, knock_.claimed_ip) == (
        7,
        22,
        ipaddress.ip_address("127.0.0.1"),
    )


def test_profile_option_with_another_host(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    """--profile NAME takes the settings of NAME, but HOST from the command line."""
    key_path, key = knock_key
    write_myserver(config_dir, key_path)
    report = json.loads(
        ok(knock("open", "::1", "22/tcp", "--profile", "myserver", "--dry-run", "--json"))
    )
    assert report["address"] == "::1", "the HOST argument lost to the profile's host"
    knock_ = opened(report["ports"], KnockLayout(30000, 4), 6, key)
    assert (knock_.user_id, knock_.claimed_ip) == (7, ipaddress.ip_address("::1"))


def test_command_line_overrides_profile(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    key_path, key = knock_key
    write_myserver(config_dir, key_path)
    report = json.loads(
        ok(
            knock(
                "open",
                "myserver",
                "22/tcp",
                "--user",
                "9",
                "--base-port",
                "40000",
                "--digit-bits",
                "8",
                "--mode",
                "udp",
                "--dry-run",
                "--json",
            )
        )
    )
    assert report["mode"] == "udp" and len(report["ports"]) == 34
    assert opened(report["ports"], KnockLayout(40000, 8), 4, key).user_id == 9


def test_defaults_apply_to_bare_hosts_and_profiles(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    key_path, key = knock_key
    defaults = f'[defaults]\nuser = 5\nkey_file = "{key_path}"\nbase_port = 25000\n\n'
    (config_dir / "config.toml").write_text(defaults + '[profiles.other]\nhost = "::1"\n')
    bare = json.loads(ok(knock("open", "127.0.0.1", "22/tcp", "--dry-run", "--json")))
    assert opened(bare["ports"], KnockLayout(25000), 4, key).user_id == 5
    profiled = json.loads(ok(knock("open", "other", "22/tcp", "--dry-run", "--json")))
    assert profiled["address"] == "::1"
    assert opened(profiled["ports"], KnockLayout(25000), 6, key).user_id == 5


def test_a_host_that_names_no_profile_lists_the_profiles(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    """`knock open myserevr`: a typo of a profile, not a host without a user id."""
    write_myserver(config_dir, knock_key[0])
    result = knock("open", "myserevr", "22/tcp", "--dry-run")
    assert result.returncode != 0 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.rstrip().endswith(
        f"no user id: pass --user ID or set user in a profile (no profile 'myserevr' in "
        f"{config_dir / 'config.toml'}; known: myserver)"
    ), result.stderr
    result = knock("open", "127.0.0.1", "22/tcp", "--profile", "myserevr", "--dry-run")
    assert result.stderr.rstrip().endswith("no profile 'myserevr'; known: myserver")


def test_time_offset_moves_the_knocks_timestamp(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path
) -> None:
    key_path, key = knock_key
    write_myserver(config_dir, key_path, extra="[defaults]\ntime_offset = -300\n\n")
    args = ["open", "myserver", "22/tcp", "--dry-run", "--json"]
    profiled = json.loads(ok(knock(*args)))
    assert_recent(opened(profiled["ports"], KnockLayout(30000, 4), 4, key).timestamp + 300)
    given = json.loads(ok(knock(*args, "--time-offset", "90")))
    assert_recent(opened(given["ports"], KnockLayout(30000, 4), 4, key).timestamp - 90)


def test_config_option_reads_that_file(
    knock: Run, knock_key: tuple[Path, bytes], config_dir: Path, tmp_path: Path
) -> None:
    key_path, key = knock_key
    (config_dir / "config.toml").write_text("[defaults]\nuser = 1\n")
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(f'[defaults]\nuser = 2\nkey_file = "{key_path}"\n')
    report = json.loads(
        ok(knock("open", "127.0.0.1", "22/tcp", "--config", elsewhere, "--dry-run", "--json"))
    )
    assert opened(report["ports"], KnockLayout(), 4, key).user_id == 2


# --- bad input: non-zero exit, one line on stderr, the reason -------------------------

BAD_INPUT = {
    # id: (arguments after "open"; {key}, {cfg}... name files made below, the reason's words)
    "proto-icmp": ("127.0.0.1 22/icmp", r"protocol must be tcp or udp"),
    "port-0": ("127.0.0.1 0/tcp", r"port must be a number in 1\.\.65535"),
    "port-70000": ("127.0.0.1 70000/tcp", r"port must be a number in 1\.\.65535"),
    "port-abc": ("127.0.0.1 abc", r"port must be a number"),
    "port-superscript": ("127.0.0.1 \u00b2/tcp", r"port must be a number"),
    "unresolvable": ("nonexistent.invalid 22/tcp", r"cannot resolve host 'nonexistent\.invalid'"),
    "key-missing": ("127.0.0.1 22/tcp --key-file {missing}", r"not found"),
    "key-short": ("127.0.0.1 22/tcp --key-file {short}", r"holds 16 bytes; a key has 32 or 64"),
    "key-readable": ("127.0.0.1 22/tcp --key-file {readable}", r"chmod 600"),
    "range-digit-bits": ("::1 22/tcp --digit-bits 11", r"past 65535"),
    "range-base-port": ("127.0.0.1 22/tcp --base-port 65000", r"past 65535"),
    "digit-bits-3": ("127.0.0.1 22/tcp --digit-bits 3", r"digit_bits 3 is outside 4\.\.12"),
    "spa-in-range": ("127.0.0.1 22/tcp --spa-port 20100", r"spa_port 20100 lies inside"),
    "user-4096": ("127.0.0.1 22/tcp --user 4096", r"user id 4096 is outside 0\.\.4095"),
    "unknown-profile": ("127.0.0.1 22/tcp --profile nope", r"no profile 'nope'"),
    "config-missing": ("127.0.0.1 22/tcp --config {missing}", r"not found"),
    "config-bad-toml": ("127.0.0.1 22/tcp --config {bad_toml}", r"not valid TOML"),
    "config-not-utf8": ("127.0.0.1 22/tcp --config {not_utf8}", r"TOML|UTF-8|utf-8"),
    "config-unknown-key": (
        "127.0.0.1 22/tcp --config {unknown_key}",
        r"defaults\.colour: unknown key",
    ),
    "config-wrong-type": (
        "127.0.0.1 22/tcp --config {wrong_type}",
        r"profiles\.box\.base_port: invalid value '30000'",
    ),
    "mode-bogus": ("127.0.0.1 22/tcp --mode bogus", r"invalid choice: 'bogus'"),
    "base-port-abc": ("127.0.0.1 22/tcp --base-port abc", r"invalid int value: 'abc'"),
    "claim-v4-to-v6": ("::1 22/tcp --claimed-ip 192.0.2.10", r"192\.0\.2\.10 is IPv4 but"),
    "claim-v6-to-v4": ("127.0.0.1 22/tcp --claimed-ip 2001:db8::1", r"2001:db8::1 is IPv6 but"),
    "claim-garbage": ("127.0.0.1 22/tcp --claimed-ip 300.1.1.1", r"bad claimed address"),
    "time-offset-abc": ("127.0.0.1 22/tcp --time-offset 1h", r"'1h' is not a whole number"),
    "time-offset-far": ("127.0.0.1 22/tcp --time-offset 100000", r"more than 86400 s away"),
}


@pytest.fixture
def bad_files(tmp_path: Path, knock_key: tuple[Path, bytes]) -> dict[str, Path]:
    files = {
        "short": ("key", base64.b64encode(bytes(16)) + b"\n"),
        "readable": ("key", base64.b64encode(bytes(64)) + b"\n"),
        "bad_toml": ("toml", b"[defaults\nuser = 7\n"),
        "not_utf8": ("toml", b"[defaults]\nuser = 7 # caf\xe9\n"),
        "unknown_key": ("toml", b'[defaults]\ncolour = "blue"\n'),
        "wrong_type": ("toml", b'[profiles.box]\nbase_port = "30000"\n'),
    }
    paths = {"missing": tmp_path / "missing"}
    for name, (suffix, content) in files.items():
        paths[name] = tmp_path / f"{name}.{suffix}"
        paths[name].write_bytes(content)
        paths[name].chmod(0o600)
    paths["readable"].chmod(0o644)
    return paths


@pytest.mark.parametrize("args, reason", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_on_stderr(
    knock: Run,
    knock_key: tuple[Path, bytes],
    bad_files: dict[str, Path],
    args: str,
    reason: str,
) -> None:
    argv = args.format(**bad_files).split()
    if "--key-file" not in argv:
        argv += ["--key-file", str(knock_key[0])]
    if "--user" not in argv:
        argv += ["--user", "7"]
    result = knock("open", *argv, "--dry-run")
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.search(reason, result.stderr), result.stderr
    assert result.stdout == ""
