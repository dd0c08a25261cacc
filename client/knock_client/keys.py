"""Key files: one base64 line holding a 256- or 512-bit AES-SIV key.

Client and daemon both load keys through ``load_key``, so both refuse the same
bad files with the same words.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from .protocol import KEY_LENGTHS

DEFAULT_KEY_BITS = 512
_MAX_KEY_FILE = 4096


class KeyFileError(Exception):
    """A key file that is missing, unsafe or does not hold a key; the message is one line."""


def generate_key(bits: int = DEFAULT_KEY_BITS) -> bytes:
    if bits // 8 not in KEY_LENGTHS or bits % 8:
        raise ValueError(f"key size {bits} bits; choose 256 or 512")
    return secrets.token_bytes(bits // 8)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, source: str = "key") -> bytes:
    try:
        key = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{source}: not a base64 key (generate one with: knock keygen)"
        ) from None
    if len(key) not in KEY_LENGTHS:
        raise KeyFileError(
            f"{source}: holds {len(key)} bytes; a key has 32 or 64 "
            "(generate one with: knock keygen)"
        )
    return key


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file, refusing one that others could read or write, as ssh does."""
    path = Path(path).expanduser()
    data = read_private_file(path, f"key file {path}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(
            f"key file {path}: not a base64 key (generate one with: knock keygen)"
        ) from None
    return decode_key(text, f"key file {path}")


def read_private_file(
    path: str | os.PathLike[str], where: str, max_bytes: int = _MAX_KEY_FILE
) -> bytes:
    """The bytes of a small secret file (a key, a password, a TLS key) that only its owner
    may read or write, as ssh wants of its keys; ``where`` names it in the one-line error,
    which a file over ``max_bytes`` also gets."""
    try:
        # O_NONBLOCK: a FIFO planted as the file must not hang the daemon or client.
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"{where}: not a regular file")
            if os.name == "posix" and info.st_mode & 0o077:
                raise KeyFileError(
                    f"{where}: readable or writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
                )
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{where}: not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"{where}: not a regular file") from None
    except PermissionError:
        raise KeyFileError(f"{where}: permission denied") from None
    except OSError as error:
        raise KeyFileError(f"{where}: {error.strerror}") from None
    if len(data) > max_bytes:
        raise KeyFileError(f"{where}: larger than {max_bytes} bytes: not what it should hold")
    return data


def write_key_file(path: str | os.PathLike[str], key: bytes, overwrite: bool = False) -> Path:
    """Create a key file with mode 0600 from the first byte on (never a readable moment)."""
    path = Path(path).expanduser()
    # A fresh account has no ~/.config/knock: make the missing folders, private ones.
    missing = [folder for folder in path.parents if not folder.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise KeyFileError(
                f"key file {path}: cannot create its folder {folder}: {error.strerror}"
            ) from None
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"key file {path}: already exists (pass --force to replace it)"
        ) from None
    except OSError as error:
        raise KeyFileError(f"key file {path}: {error.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        if os.name == "posix":
            os.fchmod(fd, 0o600)  # O_TRUNC keeps an old file's mode
        handle.write(encode_key(key) + "\n")
    return path
