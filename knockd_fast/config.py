"""The daemon's configuration: one TOML file -> frozen dataclasses.

``load_config`` checks everything it can before the daemon touches the network:
types, ranges, unknown keys (a typo is an error, never silently ignored), the knock
layout for both message lengths, and every user's key file (through
``knock_client.keys.load_key``, the loader the client uses). Every failure is one
``ConfigError`` whose text is one line, ``"{file}: {dotted.key}: {reason}"``.

docs/config-example.toml is a complete, commented example.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knock_client.cli import UsageError, parse_port_spec
from knock_client.keys import KeyFileError, load_key, read_private_file
from knock_client.protocol import (
    MAX_USER_ID,
    MESSAGE_LEN_IPV4,
    MESSAGE_LEN_IPV6,
    KnockLayout,
    LayoutError,
)

from .capture_spec import GROUP_BY, GROUP_BY_ADDRESS_AND_PORT, MAX_DESTINATIONS
from .firewall import registry
from .firewall.nftables import (
    DEFAULT_PRIORITY,
    DEFAULT_TABLE,
    MAX_COMMENT_BYTES,
    check_priority,
    check_table,
    comment_fits,
)
from .firewall.xtables import DEFAULT_CHAIN, HOOKS, check_chain

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MODES = ("syn", "udp", "spa")
KNOCK_MODES = frozenset({"syn", "udp"})
MAX_WINDOW = 3600
# Bounds of what can work. A table slot costs 144 bytes (a 128-byte slot and two index
# entries): 2**24 slots are 2.4 GB per interface, past that the start fails to allocate.
MAX_TABLE_SIZE = 1 << 24
# A knock is 34 to 92 packets; below a tenth of a second every knock across a real network
# expires before its last packet (1e-300 made every knock expire).
MIN_KNOCK_TIMEOUT = 0.1
MAX_INT31 = 2**31 - 1
# Per-user caps ([limits], and a user's own): a person opens a few ports (ssh, https, a VPN)
# from a few places (home, phone, laptop, on IPv4 and IPv6): 3 x 4 = 12 grants fit in 16;
# they knock a few times a minute at most: 30 accepted messages a minute leaves room for a
# script that reconnects every 2 s. A key that opened 3,000 grants for 3,000 spoofed
# addresses stops at 16, and queues at most 30 firewall changes a minute.
DEFAULT_MAX_GRANTS = 16
DEFAULT_MAX_KNOCKS_PER_MINUTE = 30
MAX_GRANTS = 65536  # the upper bounds catch typos: no person needs more
MAX_KNOCKS_PER_MINUTE = 60_000
# [grants] keys that only one backend reads: naming one with another backend is an error.
_BACKEND_KEYS = {
    "nftables": ("protect", "nft_table", "nft_priority", "nft_sets_only"),
    "ipset": ("ipset_name", "ipset_maxelem"),
}
_LIMIT_KEYS = ("max_grants", "max_knocks_per_minute")  # in [limits] and in [[users]]
IFNAMSIZ = 16  # Linux: interface names have at most 15 bytes
DEFAULT_STATE_DIR = "/var/lib/knockd-fast"
_ADDRESS_BITS = {4: 32, 6: 128}
# The ipset backend's sets: ipset's own default size; its names hold 31 bytes, the backend
# adds "-v6-any" (7) to the common name.
DEFAULT_IPSET_NAME = "knockd-fast"
DEFAULT_IPSET_MAXELEM = 65_536
MAX_IPSET_MAXELEM = 2**31 - 1
_IPSET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,24}")


MAX_NAME_LENGTH = 64


class ConfigError(Exception):
    """A configuration the daemon refuses; ``str()`` is one line naming file and key."""

    def __init__(self, file: str | os.PathLike[str], key: str | None, reason: str) -> None:
        self.file = str(file)
        self.key = key
        self.reason = " ".join(str(reason).split())  # always one line
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + self.reason)


@dataclass(frozen=True)
class KnockSettings:
    """Settings shared with the clients (docs/protocol.md §6) plus the daemon's timing."""

    layout: KnockLayout
    modes: frozenset[str]
    knock_timeout: float
    window: int
    # How the capture groups digits into knocks: "address+port" (each knock's packets share
    # a source port; a blind spoofer must guess it) or "address" (for NATs that rewrite
    # source ports per connection; a blind spoofer can break knocks). docs/capture.md.
    group_by: str = GROUP_BY_ADDRESS_AND_PORT

    @property
    def knock_mode(self) -> bool:
        """Whether knocks (syn or udp digits) are accepted, not only single packets."""
        return bool(self.modes & KNOCK_MODES)


@dataclass(frozen=True)
class CaptureSettings:
    """``[capture]``. ``interfaces`` holds one or more names, each once, or only "any"."""

    interfaces: tuple[str, ...]
    destinations: tuple[IPAddress, ...]  # () = the interfaces' own addresses
    table_size: int  # per interface: each has its own capture engine and table
    buffer_bytes: int  # per interface

    @property
    def label(self) -> str:
        """The interfaces as logs show them: ``eth0`` or ``eth0, eth1``."""
        return ", ".join(self.interfaces)


@dataclass(frozen=True)
class GrantSettings:
    default_timeout: int
    max_timeout: int
    backend: str
    chain: str
    hooks: tuple[str, ...]
    # The nftables backend's own (docs/admin.md, "The nftables backend").
    protect: tuple[tuple[int, str], ...] = ()  # (port, proto) our chains drop unless granted
    nft_table: str = DEFAULT_TABLE  # table inet NAME
    nft_priority: int = DEFAULT_PRIORITY  # of our base chains
    nft_sets_only: bool = False  # only the sets; the admin's own rules reference them
    # The ipset backend's: its sets' common name (N-v4, N-v4-any, N-v6, N-v6-any) and the
    # most entries (grants) one set holds.
    ipset_name: str = DEFAULT_IPSET_NAME
    ipset_maxelem: int = DEFAULT_IPSET_MAXELEM


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: where the Prometheus metrics go besides the state directory's file."""

    listen: tuple[IPAddress, int] | None = None  # the HTTP endpoint's address and port
    textfile: Path | None = None  # a file for node_exporter's textfile collector

    @property
    def listen_text(self) -> str:
        if self.listen is None:
            return ""
        address, port = self.listen
        return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


FLEET_ON_UNAVAILABLE = ("local", "refuse")
# Host (a name, an IPv4 address, or an IPv6 one in brackets), port, database; no query: its
# options would override the daemon's (TLS checks, the 0.5 s bound on a command).
_FLEET_URL = re.compile(
    r"rediss?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/\d{1,5})?/?"
)


@dataclass(frozen=True)
class FleetSettings:
    """``[fleet]``: the gateways this one shares replay claims and grants with, through
    Redis (docs/admin.md, "A fleet of gateways"). Off while ``url`` is empty.

    ``key`` (the fleet key, from ``key_file``) and ``password`` (from ``password_file``)
    are left out of ``repr``: a logged settings object never shows a secret."""

    url: str = ""  # redis://HOST:PORT/DB, or rediss:// for TLS
    gateway: str = ""  # this gateway's name in claims and events (default: the host name)
    key_file: Path | None = None
    username: str = ""  # a Redis ACL user; "" is the default user
    password_file: Path | None = None
    tls_ca_file: Path | None = None  # the CA that signed the server's certificate
    tls_cert_file: Path | None = None  # this gateway's client certificate, if Redis asks
    tls_key_file: Path | None = None
    on_unavailable: str = "local"  # FLEET_ON_UNAVAILABLE
    key: bytes = field(default=b"", repr=False)
    password: str | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class LimitSettings:
    """``[limits]``: the caps of every user whose ``[[users]]`` entry does not set its own."""

    max_grants: int = DEFAULT_MAX_GRANTS  # live grants a user holds at once
    max_knocks_per_minute: int = DEFAULT_MAX_KNOCKS_PER_MINUTE  # accepted messages, any 60 s


@dataclass(frozen=True)
class User:
    """One ``[[users]]`` entry.

    ``key`` is empty when the config was loaded with ``load_keys=False``; it is left out
    of ``repr`` so that a logged ``User`` never shows a secret.
    ``source_prefix`` maps an address family (4, 6) to the prefix length that claimed
    and real source must share; ``None`` means no check at all (``source = "any"``).
    The caps are the user's own or ``[limits]``'s, resolved when the file is read.
    """

    id: int
    name: str
    key: bytes = field(repr=False)
    key_file: Path
    allow: frozenset[tuple[int, str]]
    source_prefix: dict[int, int] | None
    max_grants: int = DEFAULT_MAX_GRANTS
    max_knocks_per_minute: int = DEFAULT_MAX_KNOCKS_PER_MINUTE

    def allows(self, port: int, proto: object) -> bool:
        """Whether ``port/proto`` is allowed; ``proto`` is "tcp"/"udp" or a ``Proto``."""
        return (port, str(proto).lower()) in self.allow

    def source_matches(self, claimed: IPAddress, actual: IPAddress) -> bool:
        """Whether the claimed address passes this user's source policy for ``actual``."""
        if self.source_prefix is None:
            return True
        if claimed.version != actual.version:
            return False
        bits = _ADDRESS_BITS[claimed.version]
        prefix = self.source_prefix[claimed.version]
        shift = bits - prefix
        return int(claimed) >> shift == int(actual) >> shift


@dataclass(frozen=True)
class Config:
    path: Path
    knock: KnockSettings
    capture: CaptureSettings
    grants: GrantSettings
    state_dir: Path
    users: Mapping[int, User]  # by id; read-only (types.MappingProxyType)
    limits: LimitSettings = LimitSettings()  # the defaults; each User holds its own caps
    metrics: MetricsSettings = MetricsSettings()
    fleet: FleetSettings = FleetSettings()


# --- reloading ------------------------------------------------------------------------

# What a reload cannot change, by its key in the file: the capture engines, the backend and
# the state directory are set up with these at start. Everything else applies at once.
RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("knock.base_port", lambda c: c.knock.layout.base_port),
    ("knock.digit_bits", lambda c: c.knock.layout.digit_bits),
    ("knock.spa_port", lambda c: c.knock.layout.spa_port),
    ("knock.knock_timeout", lambda c: c.knock.knock_timeout),
    ("knock.group_by", lambda c: c.knock.group_by),
    ("capture.interface", lambda c: c.capture.interfaces),
    ("capture.destinations", lambda c: c.capture.destinations),
    ("capture.table_size", lambda c: c.capture.table_size),
    ("capture.buffer_bytes", lambda c: c.capture.buffer_bytes),
    ("grants.backend", lambda c: c.grants.backend),
    ("grants.chain", lambda c: c.grants.chain),
    ("grants.hooks", lambda c: c.grants.hooks),
    ("grants.protect", lambda c: c.grants.protect),
    ("grants.nft_table", lambda c: c.grants.nft_table),
    ("grants.nft_priority", lambda c: c.grants.nft_priority),
    ("grants.nft_sets_only", lambda c: c.grants.nft_sets_only),
    ("grants.ipset_name", lambda c: c.grants.ipset_name),
    ("grants.ipset_maxelem", lambda c: c.grants.ipset_maxelem),
    ("state.directory", lambda c: c.state_dir),
    ("metrics.listen", lambda c: c.metrics.listen_text),
    # The link to the fleet is made once; a reload changes only what it does while down.
    ("fleet.url", lambda c: c.fleet.url),
    ("fleet.gateway", lambda c: c.fleet.gateway),
    ("fleet.key_file", lambda c: c.fleet.key_file),
    ("fleet.username", lambda c: c.fleet.username),
    ("fleet.password_file", lambda c: c.fleet.password_file),
    ("fleet.tls_ca_file", lambda c: c.fleet.tls_ca_file),
    ("fleet.tls_cert_file", lambda c: c.fleet.tls_cert_file),
    ("fleet.tls_key_file", lambda c: c.fleet.tls_key_file),
)


def reloaded(running: Config, fresh: Config) -> tuple[Config, list[str]]:
    """What the daemon runs on after reading ``fresh`` from its file: ``fresh`` with every
    ``RESTART_ONLY`` setting as ``running`` has it; and each of those that differs, as
    ``key running-value -> file-value``. Compared with what runs, not with the file read
    before: a change waiting for a restart is named at every reload until then."""
    pending = [
        f"{key} {_setting_text(get(running))} -> {_setting_text(get(fresh))}"
        for key, get in RESTART_ONLY
        if get(running) != get(fresh)
    ]
    knock = dataclasses.replace(
        fresh.knock,
        layout=running.knock.layout,
        knock_timeout=running.knock.knock_timeout,
        group_by=running.knock.group_by,
    )
    grants = dataclasses.replace(
        running.grants,
        default_timeout=fresh.grants.default_timeout,
        max_timeout=fresh.grants.max_timeout,
    )
    metrics = dataclasses.replace(fresh.metrics, listen=running.metrics.listen)
    fleet = dataclasses.replace(running.fleet, on_unavailable=fresh.fleet.on_unavailable)
    effective = dataclasses.replace(
        fresh,
        knock=knock,
        capture=running.capture,
        grants=grants,
        state_dir=running.state_dir,
        metrics=metrics,
        fleet=fleet,
    )
    return effective, pending


def _setting_text(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_setting_text, value)) + "]"
    return str(value)


# --- loading --------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], load_keys: bool = True) -> Config:
    """Read and check the config file at ``path``; raise ``ConfigError`` on any fault.

    Relative paths inside the file (``key_file``, ``state.directory``) are relative to
    the directory holding the config file. ``load_keys=False`` checks everything but the
    key files (e.g. ``check-config`` as a user who may not read them); keys are then empty.
    """
    file = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(file, None, f"not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, None, "not valid TOML: the file is not UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(file, None, "cannot read config file: not found") from None
    except IsADirectoryError:
        raise ConfigError(file, None, "cannot read config file: is a directory") from None
    except OSError as error:
        raise ConfigError(file, None, f"cannot read config file: {error.strerror}") from None
    config_path = Path(os.path.abspath(path))
    unsafe = insecure_path(config_path)
    if unsafe:
        raise ConfigError(file, None, unsafe)
    return _Reader(file, config_path.parent).config(data, config_path, load_keys)


_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def insecure_path(path: Path) -> str | None:
    """Why someone but root or this process's user could change what ``path`` holds (sshd's
    StrictModes): the file or a directory above it owned by another user, or writable by
    group or others; None if nobody could. A world-writable directory with the sticky bit
    (/tmp) is safe: nobody may replace another's entries in it. A symbolic link is judged
    by where it points and where it lies; a part of the path not there yet is skipped."""
    trusted = {0, os.geteuid()}
    real = Path(os.path.realpath(path))
    chain = [real, *real.parents]
    lies_in = Path(os.path.abspath(path)).parent
    if lies_in != real.parent:
        chain += [lies_in, *lies_in.parents]
    for item in chain:
        try:
            info = os.stat(item)
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"cannot check {item}: {error.strerror}"
        what = "directory " if stat.S_ISDIR(info.st_mode) else ""
        if info.st_uid not in trusted:
            owners = " or ".join(f"uid {uid}" for uid in sorted(trusted))
            return f"{what}{item} is owned by uid {info.st_uid}, not {owners}"
        sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & _OTHERS_WRITE and not sticky:
            mode = stat.S_IMODE(info.st_mode)
            return f"{what}{item} is writable by group or others (mode {mode:04o})"
    return None


_Section = dict[str, Any]


def _password(path: Path) -> str:
    """A password file: one line of printable text."""
    data = read_private_file(path, f"password file {path}")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"password file {path}: not UTF-8 text") from None
    if not text or not text.isprintable():
        raise KeyFileError(f"password file {path}: not one line of printable text")
    return text


# A TLS private key in PEM: an RSA key of 16,384 bits is 12.7 kB.
MAX_TLS_KEY_BYTES = 65_536


def _private(path: Path) -> None:
    """A TLS private key: a regular file only its owner may read (the key files' checks)."""
    read_private_file(path, f"key file {path}", MAX_TLS_KEY_BYTES)


class _Reader:
    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir

    def error(self, key: str | None, reason: str) -> ConfigError:
        return ConfigError(self.file, key, reason)

    # -- generic checks --

    def table(self, data: _Section, key: str, name: str) -> _Section:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_describe(value)}")
        return value

    def no_unknown(self, section: _Section, prefix: str, known: tuple[str, ...]) -> None:
        for name in section:
            if name not in known:
                what = "table" if isinstance(section[name], dict | list) and not prefix else "key"
                where = f"{prefix}.{name}" if prefix else name
                raise self.error(where, f"unknown {what} (known: {', '.join(known)})")

    def integer(
        self, section: _Section, prefix: str, name: str, default: Any, low: int, high: int
    ) -> int:
        key = f"{prefix}.{name}"
        value = section.get(name, default)
        if value is _REQUIRED:
            raise self.error(key, "missing (required)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise self.error(key, f"{value} is outside {low}..{high}")
        return value

    def string(self, section: _Section, prefix: str, name: str, default: Any) -> str:
        key = f"{prefix}.{name}"
        value = section.get(name, default)
        if value is _REQUIRED:
            raise self.error(key, "missing (required)")
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def choice(self, section: _Section, prefix: str, name: str, default: str, choices) -> str:
        value = self.string(section, prefix, name, default)
        if value not in choices:
            raise self.error(
                f"{prefix}.{name}", f"{value!r} is not one of {', '.join(map(repr, choices))}"
            )
        return value

    def string_list(
        self, section: _Section, prefix: str, name: str, default: Any
    ) -> list[tuple[str, str]]:
        """A list of strings, as (dotted key of the item, item)."""
        key = f"{prefix}.{name}"
        value = section.get(name, default)
        if value is _REQUIRED:
            raise self.error(key, "missing (required)")
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of strings, got {_describe(value)}")
        items = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{index}]", f"expected a string, got {_describe(item)}")
            items.append((f"{key}[{index}]", item))
        return items

    def subset(
        self, section: _Section, prefix: str, name: str, default: list[str], choices
    ) -> tuple[str, ...]:
        key = f"{prefix}.{name}"
        chosen: list[str] = []
        for item_key, item in self.string_list(section, prefix, name, default):
            if item not in choices:
                raise self.error(
                    item_key, f"{item!r} is not one of {', '.join(map(repr, choices))}"
                )
            if item in chosen:
                raise self.error(item_key, f"{item!r} is listed twice")
            chosen.append(item)
        if not chosen:
            raise self.error(key, f"must name at least one of {', '.join(map(repr, choices))}")
        return tuple(chosen)

    def path(self, text: str) -> Path:
        return self.base_dir / Path(text).expanduser()

    # -- sections --

    def config(self, data: _Section, path: Path, load_keys: bool) -> Config:
        self.no_unknown(
            data,
            "",
            ("knock", "capture", "grants", "limits", "state", "metrics", "fleet", "users"),
        )
        knock = self.knock(self.table(data, "knock", "knock"))
        capture = self.capture(self.table(data, "capture", "capture"))
        grants = self.grants(self.table(data, "grants", "grants"))
        limits_section = self.table(data, "limits", "limits")
        self.no_unknown(limits_section, "limits", _LIMIT_KEYS)
        limits = self.limits(limits_section, "limits", LimitSettings())
        state = self.table(data, "state", "state")
        self.no_unknown(state, "state", ("directory",))
        state_dir = self.path(self.string(state, "state", "directory", DEFAULT_STATE_DIR))
        unsafe = insecure_path(state_dir)
        if unsafe:  # the replay cache lives there: whoever can write it can reopen replays
            raise self.error("state.directory", unsafe)
        metrics = self.metrics(self.table(data, "metrics", "metrics"))
        fleet = self.fleet(self.table(data, "fleet", "fleet"), load_keys)
        users = self.users(data.get("users", _REQUIRED), load_keys, limits)
        if grants.backend == "nftables":
            for index, user in enumerate(users.values()):
                if not comment_fits(user.name):
                    raise self.error(
                        f"users[{index}].name",
                        f"{user.name[:40]!r}... is too long for the nftables backend: its "
                        f"element comment (user name percent-encoded, and the expiry) holds "
                        f"{MAX_COMMENT_BYTES} bytes",
                    )
        return Config(
            path=path,
            knock=knock,
            capture=capture,
            grants=grants,
            state_dir=state_dir,
            users=types.MappingProxyType(users),
            limits=limits,
            metrics=metrics,
            fleet=fleet,
        )

    def knock(self, section: _Section) -> KnockSettings:
        p = "knock"
        self.no_unknown(
            section,
            p,
            (
                "base_port",
                "digit_bits",
                "spa_port",
                "modes",
                "knock_timeout",
                "window",
                "group_by",
            ),
        )
        base_port = self.integer(section, p, "base_port", 20000, -MAX_INT31, MAX_INT31)
        digit_bits = self.integer(section, p, "digit_bits", 8, -MAX_INT31, MAX_INT31)
        spa_port = self.integer(section, p, "spa_port", 62201, -MAX_INT31, MAX_INT31)
        try:  # the range checks are the protocol's, with its words
            layout = KnockLayout(base_port, digit_bits, spa_port)
            layout.port_range(MESSAGE_LEN_IPV4)
            layout.port_range(MESSAGE_LEN_IPV6)
        except LayoutError as error:
            raise self.error(p, str(error)) from None
        modes = self.subset(section, p, "modes", ["syn", "udp", "spa"], MODES)
        timeout = section.get("knock_timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise self.error(f"{p}.knock_timeout", f"expected seconds, got {_describe(timeout)}")
        if not (math.isfinite(timeout) and MIN_KNOCK_TIMEOUT <= timeout <= 3600):
            raise self.error(
                f"{p}.knock_timeout",
                f"{timeout}: must be at least {MIN_KNOCK_TIMEOUT} and at most 3600 seconds",
            )
        window = self.integer(section, p, "window", 30, 1, MAX_WINDOW)
        group_by = self.choice(section, p, "group_by", GROUP_BY_ADDRESS_AND_PORT, GROUP_BY)
        return KnockSettings(layout, frozenset(modes), float(timeout), window, group_by)

    def metrics(self, section: _Section) -> MetricsSettings:
        p = "metrics"
        self.no_unknown(section, p, ("listen", "textfile"))
        listen = section.get("listen", "")
        if not isinstance(listen, str):
            raise self.error(f"{p}.listen", f"expected a string, got {_describe(listen)}")
        textfile = section.get("textfile", "")
        if not isinstance(textfile, str):
            raise self.error(f"{p}.textfile", f"expected a string, got {_describe(textfile)}")
        return MetricsSettings(
            listen=self.listen_address(f"{p}.listen", listen) if listen else None,
            textfile=self.path(textfile) if textfile else None,
        )

    def fleet(self, section: _Section, load_keys: bool) -> FleetSettings:
        p = "fleet"
        files = ("key_file", "password_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
        self.no_unknown(section, p, ("url", "gateway", "username", *files, "on_unavailable"))
        for name, value in section.items():
            if not isinstance(value, str):
                raise self.error(f"{p}.{name}", f"expected a string, got {_describe(value)}")
        on_unavailable = self.choice(section, p, "on_unavailable", "local", FLEET_ON_UNAVAILABLE)
        url = section.get("url", "")
        if not url:
            return FleetSettings(on_unavailable=on_unavailable)
        from .fleet import check_gateway, redis_address

        if "@" in redis_address(url):
            raise self.error(
                f"{p}.url",
                "holds a user or password: put them in fleet.username and "
                "fleet.password_file (a file only the daemon's user reads), not in the url",
            )
        if not _FLEET_URL.fullmatch(url):
            raise self.error(
                f"{p}.url",
                f"{url!r} is not redis://HOST:PORT/DB (or rediss:// for TLS), with no options",
            )
        gateway = section.get("gateway") or socket.gethostname()
        try:
            check_gateway(gateway)
        except ValueError as error:
            raise self.error(f"{p}.gateway", str(error)) from None
        paths = {name: self.path(section[name]) if section.get(name) else None for name in files}
        if paths["key_file"] is None:
            raise self.error(
                f"{p}.key_file",
                "missing (required with a url): the fleet key every gateway shares, "
                "made with: knock keygen --out FILE",
            )
        tls = [name for name in files[2:] if paths[name] is not None]
        if tls and not url.startswith("rediss://"):
            raise self.error(f"{p}.{tls[0]}", "set, but the url is not rediss:// (TLS)")
        if (paths["tls_cert_file"] is None) != (paths["tls_key_file"] is None):
            raise self.error(f"{p}.tls_cert_file", "a client certificate needs its key too")
        key, password = b"", None
        if load_keys:
            key = self.secret(f"{p}.key_file", paths["key_file"], load_key)
            if paths["password_file"] is not None:
                password = self.secret(f"{p}.password_file", paths["password_file"], _password)
            if paths["tls_key_file"] is not None:
                self.secret(f"{p}.tls_key_file", paths["tls_key_file"], _private)
            for name in ("tls_ca_file", "tls_cert_file"):
                if paths[name] is not None:
                    try:
                        paths[name].open("rb").close()
                    except OSError as error:
                        reason = f"{paths[name]}: {error.strerror}"
                        raise self.error(f"{p}.{name}", reason) from None
        return FleetSettings(
            url=url,
            gateway=gateway,
            key_file=paths["key_file"],
            username=section.get("username", ""),
            password_file=paths["password_file"],
            tls_ca_file=paths["tls_ca_file"],
            tls_cert_file=paths["tls_cert_file"],
            tls_key_file=paths["tls_key_file"],
            on_unavailable=on_unavailable,
            key=key,
            password=password,
        )

    def secret(self, key: str, path: Path, read: Callable[[Path], Any]) -> Any:
        """What ``read`` makes of the secret file ``path``, with the strict checks of user
        key files: mode 0600 or tighter, and nobody but root or us able to replace it."""
        try:
            value = read(path)
        except KeyFileError as error:
            raise self.error(key, str(error)) from None
        unsafe = insecure_path(path)
        if unsafe:
            raise self.error(key, unsafe)
        return value

    def listen_address(self, key: str, text: str) -> tuple[IPAddress, int]:
        """``ADDRESS:PORT`` (an IPv6 address in brackets); no names: nothing is resolved."""
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host = text
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise self.error(key, f"{text!r}: put an IPv6 address in brackets, [::1]:9477")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise self.error(
                key, f"{text!r} is not ADDRESS:PORT with an IP address, e.g. 127.0.0.1:9477"
            ) from None
        if not (colon and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise self.error(key, f"{text!r}: the port must be 1..65535, e.g. 127.0.0.1:9477")
        return address, int(port_text)

    def capture(self, section: _Section) -> CaptureSettings:
        p = "capture"
        self.no_unknown(section, p, ("interface", "destinations", "table_size", "buffer_bytes"))
        interfaces = self.interfaces(section, p)
        destinations: list[IPAddress] = []
        for item_key, item in self.string_list(section, p, "destinations", []):
            try:
                address = ipaddress.ip_address(item)
            except ValueError:
                raise self.error(item_key, f"{item!r} is not an IP address") from None
            if address in destinations:
                raise self.error(item_key, f"{address} is listed twice")
            destinations.append(address)
        if len(destinations) > MAX_DESTINATIONS:
            raise self.error(
                f"{p}.destinations", f"{len(destinations)} addresses; at most {MAX_DESTINATIONS}"
            )
        return CaptureSettings(
            interfaces=interfaces,
            destinations=tuple(destinations),
            table_size=self.integer(section, p, "table_size", 65536, 1, MAX_TABLE_SIZE),
            buffer_bytes=self.integer(section, p, "buffer_bytes", 33554432, 1, MAX_INT31),
        )

    def interfaces(self, section: _Section, p: str) -> tuple[str, ...]:
        """``interface``: one name, or an array of names (each once); "any" only alone."""
        key = f"{p}.interface"
        value = section.get("interface", _REQUIRED)
        if isinstance(value, list):
            if not value:
                raise self.error(key, "an empty array; name at least one interface")
            items = self.string_list(section, p, "interface", _REQUIRED)
        else:
            if value is not _REQUIRED and not isinstance(value, str):
                raise self.error(
                    key, f"expected a string or an array of strings, got {_describe(value)}"
                )
            items = [(key, self.string(section, p, "interface", _REQUIRED))]
        names: list[str] = []
        for item_key, name in items:
            if not name:
                raise self.error(item_key, "must not be empty")
            if (
                len(name.encode()) >= IFNAMSIZ
                or name in (".", "..")
                or any(c in name for c in "/:")
                or any(c.isspace() for c in name)
            ):
                raise self.error(item_key, f"{name!r} is not a network interface name")
            if name in names:
                raise self.error(item_key, f"{name!r} is listed twice")
            names.append(name)
        if "any" in names and len(names) > 1:
            raise self.error(
                key, '"any" already captures on every interface; list it alone or not at all'
            )
        return tuple(names)

    def grants(self, section: _Section) -> GrantSettings:
        p = "grants"
        self.no_unknown(
            section,
            p,
            (
                "default_timeout",
                "max_timeout",
                "backend",
                "chain",
                "hooks",
                *(key for keys in _BACKEND_KEYS.values() for key in keys),
            ),
        )
        default_timeout = self.integer(section, p, "default_timeout", 300, 1, MAX_INT31)
        max_timeout = self.integer(section, p, "max_timeout", 3600, 1, MAX_INT31)
        if max_timeout < default_timeout:
            raise self.error(
                f"{p}.max_timeout",
                f"{max_timeout} is less than grants.default_timeout ({default_timeout})",
            )
        backend = self.choice(section, p, "backend", "iptables", registry.NAMES)
        for owner, keys in _BACKEND_KEYS.items():
            given = [key for key in keys if key in section]
            if given and backend != owner:
                raise self.error(
                    f"{p}.{given[0]}", f'only for backend "{owner}" (backend is {backend!r})'
                )
        chain = self.string(section, p, "chain", DEFAULT_CHAIN)
        try:
            check_chain(chain)
        except ValueError as error:
            raise self.error(f"{p}.chain", str(error)) from None
        hooks = self.subset(section, p, "hooks", ["INPUT"], HOOKS)
        protect: list[tuple[int, str]] = []
        for item_key, item in self.string_list(section, p, "protect", []):
            try:
                port, proto = parse_port_spec(item)
            except UsageError as error:
                raise self.error(item_key, str(error)) from None
            if (port, str(proto)) in protect:
                raise self.error(item_key, f"{item!r} is listed twice")
            protect.append((port, str(proto)))
        nft_table = self.string(section, p, "nft_table", DEFAULT_TABLE)
        try:
            check_table(nft_table)
        except ValueError as error:
            raise self.error(f"{p}.nft_table", str(error)) from None
        nft_priority = self.integer(
            section, p, "nft_priority", DEFAULT_PRIORITY, -MAX_INT31, MAX_INT31
        )
        try:
            check_priority(nft_priority)
        except ValueError as error:
            raise self.error(f"{p}.nft_priority", str(error)) from None
        sets_only = section.get("nft_sets_only", False)
        if not isinstance(sets_only, bool):
            raise self.error(
                f"{p}.nft_sets_only", f"expected true or false, got {_describe(sets_only)}"
            )
        if backend == "nftables":
            if sets_only and protect:
                raise self.error(
                    f"{p}.protect",
                    "nft_sets_only = true makes no chains: protect the ports in your own ruleset",
                )
            if not sets_only and not protect:
                raise self.error(
                    f"{p}.protect",
                    "empty: with backend nftables list the ports our chain drops unless granted "
                    "(an accept in our chain cannot override a drop in another base chain), or "
                    "set nft_sets_only = true and reference our sets from your own ruleset",
                )
        ipset_name = self.string(section, p, "ipset_name", DEFAULT_IPSET_NAME)
        if not _IPSET_NAME.fullmatch(ipset_name):
            raise self.error(
                f"{p}.ipset_name",
                f"{ipset_name!r}: 1..24 characters of A-Z a-z 0-9 _ . - (the set names add "
                "-v4, -v6-any..., and ipset allows 31)",
            )
        maxelem = self.integer(
            section, p, "ipset_maxelem", DEFAULT_IPSET_MAXELEM, 1, MAX_IPSET_MAXELEM
        )
        return GrantSettings(
            default_timeout,
            max_timeout,
            backend,
            chain,
            hooks,
            protect=tuple(protect),
            nft_table=nft_table,
            nft_priority=nft_priority,
            nft_sets_only=sets_only,
            ipset_name=ipset_name,
            ipset_maxelem=maxelem,
        )

    def limits(self, section: _Section, p: str, defaults: LimitSettings) -> LimitSettings:
        """The caps in ``section`` (``[limits]``, or a ``[[users]]`` entry), each one left
        out taken from ``defaults``."""
        return LimitSettings(
            max_grants=self.integer(section, p, "max_grants", defaults.max_grants, 1, MAX_GRANTS),
            max_knocks_per_minute=self.integer(
                section,
                p,
                "max_knocks_per_minute",
                defaults.max_knocks_per_minute,
                1,
                MAX_KNOCKS_PER_MINUTE,
            ),
        )

    def users(self, value: Any, load_keys: bool, limits: LimitSettings) -> dict[int, User]:
        if value is _REQUIRED:
            raise self.error("users", "no [[users]] entries; the daemon would accept nobody")
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error("users", f"expected [[users]] tables, got {_describe(value)}")
        if not value:
            raise self.error("users", "no [[users]] entries; the daemon would accept nobody")
        users: dict[int, User] = {}
        names: dict[str, int] = {}
        for index, section in enumerate(value):
            user = self.user(section, f"users[{index}]", load_keys, limits)
            if user.id in users:
                raise self.error(
                    f"users[{index}].id",
                    f"id {user.id} is already used by user {users[user.id].name!r}",
                )
            if user.name in names:
                raise self.error(
                    f"users[{index}].name",
                    f"name {user.name!r} is already used by user id {names[user.name]}",
                )
            users[user.id] = user
            names[user.name] = user.id
        return users

    def user(self, section: _Section, p: str, load_keys: bool, limits: LimitSettings) -> User:
        self.no_unknown(
            section,
            p,
            ("id", "name", "key_file", "allow", "source", *_LIMIT_KEYS),
        )
        user_id = self.integer(section, p, "id", _REQUIRED, 0, MAX_USER_ID)
        name = self.string(section, p, "name", _REQUIRED)
        if not name.isprintable():
            raise self.error(f"{p}.name", f"{name!r} has unprintable characters")
        if len(name) > MAX_NAME_LENGTH:
            # The name travels in each grant's rule comment (at most 255 bytes in xtables).
            raise self.error(f"{p}.name", f"longer than {MAX_NAME_LENGTH} characters")
        key_file = self.path(self.string(section, p, "key_file", _REQUIRED))
        allow: set[tuple[int, str]] = set()
        for item_key, item in self.string_list(section, p, "allow", _REQUIRED):
            try:
                port, proto = parse_port_spec(item)
            except UsageError as error:
                raise self.error(item_key, str(error)) from None
            allow.add((port, str(proto)))
        source_prefix = self.source(section.get("source", "exact"), f"{p}.source")
        own = self.limits(section, p, limits)
        key = b""
        if load_keys:
            try:
                key = load_key(key_file)
            except KeyFileError as error:
                raise self.error(f"{p}.key_file", str(error)) from None
            unsafe = insecure_path(key_file)
            if unsafe:
                raise self.error(f"{p}.key_file", unsafe)
        return User(
            user_id,
            name,
            key,
            key_file,
            frozenset(allow),
            source_prefix,
            own.max_grants,
            own.max_knocks_per_minute,
        )

    def source(self, value: Any, key: str) -> dict[int, int] | None:
        if value == "any":
            return None
        if value == "exact":
            return dict(_ADDRESS_BITS)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= 128:
                raise self.error(key, f"prefix length {value} is outside 0..128")
            return {4: min(value, 32), 6: value}
        if isinstance(value, dict):
            if not value:
                raise self.error(key, "an empty table; give ipv4 and/or ipv6 prefix lengths")
            prefix = dict(_ADDRESS_BITS)
            for name, item in value.items():
                family = {"ipv4": 4, "ipv6": 6}.get(name)
                if family is None:
                    raise self.error(f"{key}.{name}", "unknown key (known: ipv4, ipv6)")
                bits = _ADDRESS_BITS[family]
                if isinstance(item, bool) or not isinstance(item, int):
                    raise self.error(
                        f"{key}.{name}", f"expected a prefix length, got {_describe(item)}"
                    )
                if not 0 <= item <= bits:
                    raise self.error(f"{key}.{name}", f"prefix length {item} is outside 0..{bits}")
                prefix[family] = item
            return prefix
        raise self.error(
            key,
            f'expected "exact", "any", a prefix length or {{ ipv4 = N, ipv6 = M }}, '
            f"got {_describe(value)}",
        )


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()

_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
}


def _describe(value: object) -> str:
    """A TOML value as the error text shows it: its type and a short repr."""
    kind = next((n for t, n in _TYPE_NAMES.items() if isinstance(value, t)), type(value).__name__)
    if isinstance(value, dict | list):
        return kind
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"
