"""The ``knock`` command: ``knock keygen``, ``knock open HOST PORT/PROTO``, ``knock close ...``.

Settings come from the command line, else from a profile in
``~/.config/knock/config.toml`` (``--profile NAME``, else the profile named like
HOST), else from the protocol's defaults. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .keys import DEFAULT_KEY_BITS, KeyFileError, encode_key, generate_key, load_key, write_key_file
from .protocol import (
    DEFAULT_BASE_PORT,
    DEFAULT_DIGIT_BITS,
    DEFAULT_SPA_PORT,
    MAX_DURATION,
    MAX_USER_ID,
    SALT_BITS,
    Action,
    FieldError,
    Knock,
    KnockLayout,
    LayoutError,
    Proto,
    seal,
)
from .send import SendError, local_address_toward, resolve, send_spa, send_syn, send_udp

MODES = ("syn", "udp", "spa")
# --time-offset: a day either way covers any clock that is merely wrong; beyond that the
# knock would be refused anyway unless the server's window is absurdly wide.
MAX_TIME_OFFSET = 86_400
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line or the profile file; the message is one line."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "knock" / "config.toml"


# Profile keys, their types, and the check each value must pass.
_PROFILE_KEYS: dict[str, tuple[type, Any]] = {
    "host": (str, lambda v: bool(v)),
    "user": (int, lambda v: 0 <= v <= MAX_USER_ID),
    "key_file": (str, lambda v: bool(v)),
    "mode": (str, lambda v: v in MODES),
    "base_port": (int, lambda v: 1 <= v <= 65535),
    "digit_bits": (int, lambda v: True),
    "spa_port": (int, lambda v: 1 <= v <= 65535),
    "claimed_ip": (str, lambda v: bool(v)),
    "shuffle": (bool, lambda v: True),
    "delay_ms": (int, lambda v: 0 <= v <= 60_000),
    "duration": (int, lambda v: 0 <= v <= MAX_DURATION),
    "family": (int, lambda v: v in (4, 6)),
    "source_port": (int, lambda v: 1 <= v <= 65535),
    "time_offset": (int, lambda v: abs(v) <= MAX_TIME_OFFSET),
}


@dataclass
class Settings:
    host: str
    user: int | None = None
    key_file: str | None = None
    mode: str = "syn"
    base_port: int = DEFAULT_BASE_PORT
    digit_bits: int = DEFAULT_DIGIT_BITS
    spa_port: int = DEFAULT_SPA_PORT
    claimed_ip: str | None = None
    shuffle: bool = True
    delay_ms: int = 0
    duration: int = 0
    family: int = 0
    source_port: int | None = None  # None: a random one per knock
    time_offset: int = 0  # seconds added to this machine's clock for the message's timestamp


def load_profiles(path: Path, required: bool) -> dict[str, dict[str, Any]]:
    """Profiles from the TOML file; ``[defaults]`` applies to every profile and to bare hosts."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if required:
            raise UsageError(f"config {path}: not found") from None
        return {}
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config {path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config {path}: not valid TOML: not UTF-8") from None
    except OSError as error:
        raise UsageError(f"config {path}: {error.strerror}") from None
    unknown = set(data) - {"defaults", "profiles"}
    if unknown:
        raise UsageError(
            f"config {path}: unknown table {sorted(unknown)[0]!r} "
            "(expected [defaults] and [profiles.NAME])"
        )
    defaults = _check_profile(path, "defaults", data.get("defaults", {}))
    profiles_table = data.get("profiles", {})
    if not isinstance(profiles_table, dict):
        raise UsageError(f"config {path}: profiles: expected tables [profiles.NAME]")
    profiles = {"": defaults}
    for name, table in profiles_table.items():
        profiles[name] = {**defaults, **_check_profile(path, f"profiles.{name}", table)}
    return profiles


def _check_profile(path: Path, where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UsageError(f"config {path}: {where}: expected a table")
    for key, value in table.items():
        if key not in _PROFILE_KEYS:
            raise UsageError(
                f"config {path}: {where}.{key}: unknown key (known: {', '.join(_PROFILE_KEYS)})"
            )
        kind, valid = _PROFILE_KEYS[key]
        # bool is an int in Python; TOML keeps them apart, and so do we.
        if type(value) is not kind or not valid(value):
            raise UsageError(f"config {path}: {where}.{key}: invalid value {value!r}")
    return dict(table)


def _source_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 1..65535")
    return int(text)


def _time_offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if abs(value) > MAX_TIME_OFFSET:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_TIME_OFFSET} s away")
    return value


def parse_port_spec(spec: str) -> tuple[int, Proto]:
    """``22/tcp``, ``53/udp``, or a bare ``22`` for TCP."""
    number, _, proto_name = spec.partition("/")
    proto_name = proto_name.lower() or "tcp"
    if proto_name not in ("tcp", "udp"):
        raise UsageError(f"bad port spec {spec!r}: protocol must be tcp or udp")
    if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= 65535:
        raise UsageError(f"bad port spec {spec!r}: port must be a number in 1..65535")
    return int(number), Proto[proto_name.upper()]


def build_settings(args: argparse.Namespace) -> Settings:
    config_path = Path(args.config).expanduser() if args.config else default_config_path()
    profiles = load_profiles(config_path, required=bool(args.config))
    if args.profile is not None:
        if args.profile not in profiles or not args.profile:
            raise UsageError(
                f"config {config_path}: no profile {args.profile!r}{_known(profiles)}"
            )
        profile = profiles[args.profile]
    else:
        profile = profiles.get(args.host, profiles.get("", {}))
    profile = dict(profile)
    # `knock open NAME` knocks the profile's host; `--profile NAME HOST` knocks HOST.
    host = profile.pop("host", args.host)
    settings = Settings(host=args.host if args.profile is not None else host, **profile)
    for name in (
        "user",
        "key_file",
        "mode",
        "base_port",
        "digit_bits",
        "spa_port",
        "claimed_ip",
        "delay_ms",
        "duration",
        "family",
        "source_port",
        "time_offset",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.no_shuffle:
        settings.shuffle = False
    if settings.delay_ms < 0:
        raise UsageError(f"--delay-ms {settings.delay_ms} is negative")
    # A bare host that names no profile, where profiles exist: most often a typo of one.
    missing_profile = (
        f" (no profile {args.host!r} in {config_path}{_known(profiles)})"
        if args.profile is None and args.host not in profiles and len(profiles) > 1
        else ""
    )
    if settings.user is None:
        raise UsageError(f"no user id: pass --user ID or set user in a profile{missing_profile}")
    if settings.key_file is None:
        raise UsageError(
            f"no key file: pass --key-file FILE or set key_file in a profile{missing_profile}"
        )
    return settings


def _known(profiles: dict[str, dict[str, Any]]) -> str:
    names = sorted(name for name in profiles if name)
    return f"; known: {', '.join(names)}" if names else "; the file has none"


def knock_command(args: argparse.Namespace) -> int:
    port, proto = parse_port_spec(args.port_spec)
    settings = build_settings(args)
    try:
        layout = KnockLayout(settings.base_port, settings.digit_bits, settings.spa_port)
    except LayoutError as error:
        raise UsageError(str(error)) from None
    destination = resolve(settings.host, settings.family)
    if settings.claimed_ip is not None:
        try:
            claimed = ipaddress.ip_address(settings.claimed_ip)
        except ValueError:
            raise UsageError(f"bad claimed address {settings.claimed_ip!r}") from None
    else:
        claimed = local_address_toward(destination)
    if claimed.version != destination.address.version:
        # The daemon reads a knock's length from its source's family.
        raise UsageError(
            f"claimed address {claimed} is IPv{claimed.version} but {settings.host} is reached "
            f"over IPv{destination.address.version}"
        )
    key = load_key(settings.key_file)
    knock = Knock(
        action=Action[args.action.upper()],
        proto=proto,
        port=port,
        timestamp=int(time.time()) + settings.time_offset,
        claimed_ip=claimed,
        user_id=settings.user,
        salt=secrets.randbits(SALT_BITS),
        duration=settings.duration,
    )
    try:
        message = seal(knock, key)
        # Checked in every mode: these settings must match the server's, which refuses bad ones.
        knock_ports = layout.ports_for(message)
        ports = [layout.spa_port] if settings.mode == "spa" else knock_ports
    except (FieldError, LayoutError) as error:
        raise UsageError(str(error)) from None
    if settings.shuffle:
        secrets.SystemRandom().shuffle(ports)

    source_port = settings.source_port
    if not args.dry_run:
        delay_s = settings.delay_ms / 1000
        if settings.mode == "syn":
            source_port = send_syn(destination, ports, delay_s, source_port)
        elif settings.mode == "udp":
            source_port = send_udp(destination, ports, delay_s, source_port)
        else:
            send_spa(destination, layout.spa_port, message)

    if args.json:
        print(
            json.dumps(
                {
                    "host": settings.host,
                    "address": str(destination.address),
                    "mode": settings.mode,
                    "message": message.hex(),
                    "ports": ports,
                    "source_port": source_port if settings.mode != "spa" else None,
                    "fields": knock.as_json(),
                    "sent": not args.dry_run,
                }
            )
        )
    elif args.dry_run:
        print("\n".join(map(str, ports)))
    else:
        packets = (
            "1 SPA datagram"
            if settings.mode == "spa"
            else f"{len(ports)} {settings.mode.upper()} knocks"
        )
        print(
            f"knock: {knock.action} {port}/{proto} sent to {destination.address} as user "
            f"{settings.user} ({packets}, claiming {claimed})",
            file=sys.stderr,
        )
    return 0


def keygen_command(args: argparse.Namespace) -> int:
    key = generate_key(args.bits)
    if args.out:
        path = write_key_file(args.out, key, overwrite=args.force)
        print(f"knock: wrote a {args.bits}-bit key to {path} (mode 0600)", file=sys.stderr)
    else:
        print(encode_key(key))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other failure; --help has the usage.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="knock", description="Knock on a knockd-fast server to open or close a port for you."
    )
    parser.add_argument("--version", action="version", version=f"knock {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    keygen = commands.add_parser("keygen", help="make a new key (base64)")
    keygen.add_argument(
        "--out", metavar="FILE", help="write the key to FILE, created with mode 0600"
    )
    keygen.add_argument(
        "--bits",
        type=int,
        choices=(256, 512),
        default=DEFAULT_KEY_BITS,
        help="key size (default %(default)s: AES-256-SIV)",
    )
    keygen.add_argument("--force", action="store_true", help="replace FILE if it exists")
    keygen.set_defaults(handler=keygen_command)

    for action in ("open", "close"):
        sub = commands.add_parser(
            action, help=f"ask the server to {action} PORT/PROTO for this host"
        )
        sub.add_argument("host", metavar="HOST", help="server name or address, or a profile name")
        sub.add_argument("port_spec", metavar="PORT/PROTO", help="e.g. 22/tcp or 53/udp")
        sub.add_argument(
            "--profile",
            metavar="NAME",
            help="profile from the config file (default: one named HOST)",
        )
        sub.add_argument(
            "--config", metavar="FILE", help=f"config file (default: {default_config_path()})"
        )
        sub.add_argument("--user", type=int, metavar="ID", help=f"user id, 0..{MAX_USER_ID}")
        sub.add_argument(
            "--key-file", metavar="FILE", help="this user's key file (from knock keygen)"
        )
        sub.add_argument(
            "--mode",
            choices=MODES,
            help="syn (default): TCP SYNs; udp: datagrams; spa: one datagram",
        )
        sub.add_argument(
            "--base-port",
            type=int,
            metavar="N",
            help=f"first knock port (default {DEFAULT_BASE_PORT})",
        )
        sub.add_argument(
            "--digit-bits",
            type=int,
            metavar="B",
            help=f"bits per knock, 4..12 (default {DEFAULT_DIGIT_BITS})",
        )
        sub.add_argument(
            "--spa-port", type=int, metavar="P", help=f"SPA port (default {DEFAULT_SPA_PORT})"
        )
        sub.add_argument(
            "--claimed-ip",
            metavar="ADDR",
            help="address the server will see (default: the local address routed toward HOST)",
        )
        sub.add_argument(
            "--duration",
            type=int,
            metavar="SECONDS",
            help="ask for this open time (default: the server's)",
        )
        sub.add_argument(
            "--no-shuffle", action="store_true", help="send the knocks in segment order"
        )
        sub.add_argument("--delay-ms", type=int, metavar="N", help="pause between knock packets")
        sub.add_argument(
            "--time-offset",
            type=_time_offset,
            metavar="SECONDS",
            help="add this to the local clock for the knock's timestamp, for a machine whose "
            "clock is known to be off (negative: behind)",
        )
        sub.add_argument(
            "--source-port",
            type=_source_port,
            metavar="N",
            help="send every knock packet from this port (default: a random one per knock)",
        )
        family = sub.add_mutually_exclusive_group()
        family.add_argument("-4", dest="family", action="store_const", const=4, help="use IPv4")
        family.add_argument("-6", dest="family", action="store_const", const=6, help="use IPv6")
        sub.add_argument(
            "--dry-run",
            action="store_true",
            help="print the destination ports in send order; send nothing",
        )
        sub.add_argument(
            "--json", action="store_true", help="print one JSON object: message, ports, fields"
        )
        sub.set_defaults(handler=knock_command, action=action)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"knock: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyFileError, SendError) as error:
        print(f"knock: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `knock ... --dry-run | head`: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
