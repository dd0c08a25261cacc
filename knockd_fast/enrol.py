"""Enrolment: ``knockd-fast user add|list|remove`` edit the ``[[users]]`` of a config file.

``add_user`` appends one ``[[users]]`` table at the end of the file (every byte before it
stays as it was) and makes the user's key with ``knock_client.keys``, the client's own
generator and file format; ``remove_user`` cuts one user's table out (header to the last
line tomlkit counts as its own), and by default deletes its key file. Every rule a user
must pass is the real loader's: the edited text goes to a temporary file beside the
config, ``load_config`` must accept it (with the keys, as a reload would) and must find
the same configuration but for that one user, and only then is it renamed over the
config (mode and owner kept). Otherwise nothing is written, and the error is one line
naming the file and the key, as every ``ConfigError``.

``handout`` is what the admin gives the user: the key line and a ``knock`` profile that
matches this server's knock settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import ipaddress
import os
import re
import socket
import stat
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT

from knock_client.keys import KeyFileError, encode_key, generate_key, load_key, write_key_file
from knock_client.protocol import MAX_USER_ID

from .config import Config, ConfigError, User, insecure_path, load_config

KEYS_DIR = "keys"  # beside the config file, as docs/admin.md installs it
PLACEHOLDER_HOST = "SERVER-NAME-OR-ADDRESS"
CLIENT_CONFIG = "~/.config/knock/config.toml"
# The mode a client knocks with: the first this server accepts (syn is the client's default).
CLIENT_MODES = ("syn", "udp", "spa")
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_USERS_HEADER = re.compile(r"[ \t]*\[\[[ \t]*users[ \t]*\]\][ \t]*(#[^\n]*)?\r?\n")


@dataclasses.dataclass(frozen=True)
class Removal:
    user: User  # as the file had it (loaded without its key)
    key_file_note: str  # what became of its key file, for the admin


@dataclasses.dataclass(frozen=True)
class UserRow:
    """One line of ``user list``."""

    name: str
    id: int
    allow: list[str]
    source: str
    key_file: str
    key_state: str  # "ok", or why the daemon would refuse the key file

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# --- add ------------------------------------------------------------------------------


def add_user(
    config_path: str | os.PathLike[str],
    name: str,
    allow: Sequence[str],
    source: str | int = "exact",
    user_id: int | None = None,
    key_file: str | None = None,
) -> tuple[Config, User]:
    """Enrol ``name``: a new key (0600) and a ``[[users]]`` table at the end of the file.

    ``key_file`` as the config will hold it (relative: to the config's directory);
    default ``keys/NAME.key``. ``user_id`` defaults to the lowest id no user has. Returns
    the configuration as the loader reads it back, and the new user with its key.
    """
    target = _real(config_path)
    with _locked(target.parent):
        original = _read(target)
        # A file with no user yet fails to load for that alone: the first user is added to
        # it blind, and the loader then judges the whole file with that user in it.
        no_users = _users_tables(target, original) is None
        before = None if no_users else load_config(target, load_keys=False)
        known = {} if before is None else dict(before.users)
        if user_id is None:
            user_id = _free_id(target, known)
        where = f"users[{len(known)}]"  # the index the new table will have
        stanza = _stanza(
            user_id, name, key_file or f"{KEYS_DIR}/{file_stem(name)}.key", allow, source
        )
        text = original + ("" if original.endswith("\n") or not original else "\n")
        text += ("" if text.endswith("\n\n") or not text else "\n") + stanza
        with _candidate(target, text) as candidate:
            checked = _reload(target, candidate, load_keys=False)  # every rule but the key's
            user = checked.users.get(user_id)
            if user is None or user.name != name:  # tomlkit wrote the name as another string
                raise ConfigError(target, where, "the new table did not load as written")
            if before is not None:
                _same_but_users(target, before, checked, {**known, user_id: user})
            key_path = user.key_file  # resolved as the daemon will read it
            if os.path.lexists(key_path):
                raise ConfigError(
                    target,
                    f"{where}.key_file",
                    f"key file {key_path} already exists; remove it first, or give another "
                    "--key-file (an existing key is never reused or overwritten)",
                )
            try:
                write_key_file(key_path, generate_key())
            except KeyFileError as error:
                raise ConfigError(target, f"{where}.key_file", str(error)) from None
            try:
                after = _reload(target, candidate, load_keys=True)  # as a SIGHUP would
                _commit(target, candidate)
            except BaseException:
                key_path.unlink(missing_ok=True)  # made for a file never written
                raise
    return dataclasses.replace(after, path=target), after.users[user_id]


def _stanza(user_id: int, name: str, key_file: str, allow: Sequence[str], source: str | int) -> str:
    """The new ``[[users]]`` table; values rendered by tomlkit (quoting, escapes)."""
    today = datetime.date.today().isoformat()
    lines = [
        "[[users]]",
        f"# added by `knockd-fast user add` on {today}",
        f"id = {user_id}",
        f"name = {_toml(name)}",
        f"key_file = {_toml(key_file)}",
        f"allow = {_toml(list(allow))}",
        f"source = {_toml(source)}",
    ]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    return tomlkit.item(value).as_string()


def _free_id(target: Path, users: dict[int, User]) -> int:
    for user_id in range(MAX_USER_ID + 1):
        if user_id not in users:
            return user_id
    raise ConfigError(target, "users", f"every user id 0..{MAX_USER_ID} is taken")


def file_stem(name: str) -> str:
    """A file name for ``name``'s key: its characters outside A-Z a-z 0-9 _ . - become
    ``_``, and so does a leading dot (no hidden files, no ``..``)."""
    stem = _UNSAFE_FILE_CHARS.sub("_", name)
    return "_" + stem[1:] if stem.startswith(".") else stem


# --- remove ---------------------------------------------------------------------------


def remove_user(config_path: str | os.PathLike[str], name: str, keep_key: bool = False) -> Removal:
    """Cut ``name``'s ``[[users]]`` table out of the file; delete its key file unless
    ``keep_key`` or another user names the same file. A running daemon closes the user's
    grants at its next reload (``Doorman.close_unentitled``)."""
    target = _real(config_path)
    with _locked(target.parent):
        original = _read(target)
        before = load_config(target, load_keys=False)
        index, user = _find(target, before, name)
        text = _without_table(target, original, index, name)
        with _candidate(target, text) as candidate:
            checked = _reload(target, candidate, load_keys=False)
            rest = {uid: other for uid, other in before.users.items() if uid != user.id}
            _same_but_users(target, before, checked, rest)
            _reload(target, candidate, load_keys=True)  # a reload must take it, or it is moot
            _commit(target, candidate)
    sharers = [other.name for other in rest.values() if other.key_file == user.key_file]
    if keep_key:
        note = f"kept key file {user.key_file} (--keep-key)"
    elif sharers:
        note = f"kept key file {user.key_file}: user {sharers[0]!r} uses it too"
    else:
        try:
            user.key_file.unlink()
            note = f"deleted key file {user.key_file}"
        except FileNotFoundError:
            note = f"key file {user.key_file} was already gone"
        except OSError as error:
            note = f"could not delete key file {user.key_file}: {error.strerror}; delete it"
    return Removal(user, note)


def _find(target: Path, config: Config, name: str) -> tuple[int, User]:
    for index, user in enumerate(config.users.values()):  # file order
        if user.name == name:
            return index, user
    known = ", ".join(repr(user.name) for user in config.users.values())
    raise ConfigError(target, "users", f"no user named {name!r} (users: {known})")


def _without_table(target: Path, text: str, index: int, name: str) -> str:
    """``text`` less the ``[[users]]`` table of ``name``: its header line and what tomlkit
    counts as its body (its keys, sub-tables, comments), less the comment lines that end
    it after a blank line: those sit on top of the next table and speak of that one."""
    tables = _users_tables(target, text)
    assert tables is not None, "the loader found users"
    body = next(table for table in tables if table.get("name") == name).as_string()
    start = text.find(body)
    header_start = text.rfind("\n", 0, max(start - 1, 0)) + 1
    if start < 0 or text.count(body) != 1 or not _USERS_HEADER.fullmatch(text[header_start:start]):
        raise ConfigError(
            target, f"users[{index}]", "cannot tell its table's text apart; remove it by hand"
        )
    lines = body.splitlines(keepends=True)
    own = len(lines)
    while own and lines[own - 1].lstrip().startswith("#"):
        own -= 1
    if own == len(lines) or lines[own - 1].strip():  # no blank line above those comments
        own = len(lines)
    return text[:header_start] + "".join(lines[own:]) + text[start + len(body) :]


def _users_tables(target: Path, text: str) -> AoT | None:
    """The ``[[users]]`` tables as tomlkit reads them (None: the file has no users); refuses
    ``users = [...]`` (an array written inline takes no new table after it)."""
    try:
        tables = tomlkit.parse(text).get("users")
    except TOMLKitError as error:
        raise ConfigError(target, None, f"not valid TOML: {error}") from None
    if tables is not None and not isinstance(tables, AoT):
        raise ConfigError(
            target, "users", "an inline array: write each user as a [[users]] table to edit them"
        )
    return tables


# --- list -----------------------------------------------------------------------------


def list_users(config_path: str | os.PathLike[str]) -> list[UserRow]:
    """Every user in file order, with whether the daemon would load its key file."""
    config = load_config(config_path, load_keys=False)
    return [
        UserRow(
            name=user.name,
            id=user.id,
            allow=[f"{port}/{proto}" for port, proto in sorted(user.allow)],
            source=source_text(user.source_prefix),
            key_file=str(user.key_file),
            key_state=key_state(user.key_file),
        )
        for user in config.users.values()
    ]


def source_text(prefix: dict[int, int] | None) -> str:
    """A loaded ``source`` policy as the file would say it."""
    if prefix is None:
        return "any"
    if prefix == {4: 32, 6: 128}:
        return "exact"
    if prefix[4] == min(prefix[6], 32):
        return str(prefix[6])
    return f"{{ ipv4 = {prefix[4]}, ipv6 = {prefix[6]} }}"


def key_state(path: Path) -> str:
    """Whether the daemon would load the key file: "ok (mode 0600)", or its own reason (the
    same checks: ``load_key``, then who could change it)."""
    try:
        load_key(path)
    except KeyFileError as error:
        return str(error).removeprefix(f"key file {path}: ")
    unsafe = insecure_path(path)
    if unsafe:
        return unsafe
    return f"ok (mode {stat.S_IMODE(os.stat(path).st_mode):04o})"


# --- what to hand the user ------------------------------------------------------------


def profile_name(host: str | None) -> str:
    """The profile a user knocks by: an address as is, a host name's first label, or
    without a host this machine's short name."""
    if host is None:
        return socket.gethostname().split(".")[0] or "server"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return host.split(".")[0] or host


def client_mode(modes: frozenset[str]) -> str:
    return next(mode for mode in CLIENT_MODES if mode in modes)


def handout(config: Config, user: User, host: str | None, profile: str | None = None) -> str:
    """The text for the user: their key line and a profile matching this server's knock
    settings (the numbers a client must share, docs/protocol.md §6), and the command."""
    profile = profile or profile_name(host)
    layout = config.knock.layout
    key_path = f"~/.config/knock/{file_stem(profile)}.key"
    port, proto = min(user.allow) if user.allow else (22, "tcp")
    host_line = f"host = {_toml(host or PLACEHOLDER_HOST)}"
    if host is None:
        host_line += "  # put this server's name or address here"
    lines = [
        f"# For {user.name}: your knockd-fast account (user id {user.id}; may open "
        f"{', '.join(f'{p}/{q}' for p, q in sorted(user.allow)) or 'nothing yet'}).",
        "#",
        f"# 1. Save the key line below as {key_path}, readable by you alone:",
        "#      mkdir -p ~/.config/knock && (umask 077; cat > " + key_path + ")",
        "#    paste the line, then press Ctrl-D. Keep it secret: it is your password.",
        encode_key(user.key),
        "#",
        f"# 2. Add this profile to {CLIENT_CONFIG}:",
        f"[profiles.{tomlkit.key(profile).as_string()}]",
        host_line,
        f"user = {user.id}",
        f"key_file = {_toml(key_path)}",
        f"mode = {_toml(client_mode(config.knock.modes))}",
        f"base_port = {layout.base_port}",
        f"digit_bits = {layout.digit_bits}",
        f"spa_port = {layout.spa_port}",
        "#",
        f"# 3. Knock, then connect: the port stays open for you {config.grants.default_timeout} "
        "s (your clock must be",
        f"#    within {config.knock.window} s of the server's):",
        f"#      knock open {profile} {port}/{proto}",
    ]
    return "\n".join(lines) + "\n"


# --- the file -------------------------------------------------------------------------


def _real(config_path: str | os.PathLike[str]) -> Path:
    """Where the config really is: a symbolic link is kept, the file it names is edited."""
    return Path(os.path.realpath(config_path))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One editor at a time: two ``user add`` at once would each write the file they read."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise ConfigError(directory, None, f"cannot open its directory: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(target: Path) -> str:
    try:
        return target.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(target, None, "not valid TOML: the file is not UTF-8") from None
    except OSError as error:
        raise ConfigError(target, None, f"cannot read config file: {error.strerror}") from None


@contextlib.contextmanager
def _candidate(target: Path, text: str) -> Iterator[Path]:
    """``text`` in a new file beside ``target``, with its mode and owner, on disk (fsync);
    removed on the way out unless ``_commit`` renamed it."""
    path = None
    try:
        info = os.stat(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
        path = Path(name)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(handle.fileno(), info.st_uid, info.st_gid)
            os.fchmod(handle.fileno(), stat.S_IMODE(info.st_mode))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if path is not None:
            path.unlink(missing_ok=True)
        raise ConfigError(target, None, f"cannot write its new version: {error.strerror}") from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _reload(target: Path, candidate: Path, load_keys: bool) -> Config:
    """``load_config`` of the candidate, its errors told of ``target`` (the file the admin
    knows; the candidate's name never reaches them)."""
    try:
        return load_config(candidate, load_keys=load_keys)
    except ConfigError as error:
        reason = error.reason.replace(str(candidate), str(target))
        raise ConfigError(target, error.key, reason) from None


def _same_but_users(target: Path, before: Config, after: Config, users: dict[int, User]) -> None:
    """The edit must change the users to ``users`` and nothing else the daemon reads."""
    expected = dataclasses.replace(before, users=types.MappingProxyType(users))
    if dataclasses.replace(after, path=before.path) != expected:
        raise ConfigError(
            target, "users", "the edit would change more than one user; edit the file by hand"
        )


def _commit(target: Path, candidate: Path) -> None:
    try:
        os.replace(candidate, target)
    except OSError as error:
        raise ConfigError(target, None, f"cannot replace it: {error.strerror}") from None
    # The rename is done: a directory that cannot be synced costs durability, not the edit.
    with contextlib.suppress(OSError):
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # so the rename itself survives a crash
        finally:
            os.close(directory)
