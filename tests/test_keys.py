"""Key files: generation, safe creation, loading, and one-line errors that name the file."""

from __future__ import annotations

import base64
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from knock_client.keys import (
    KeyFileError,
    decode_key,
    encode_key,
    generate_key,
    load_key,
    write_key_file,
)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(KeyFileError) as caught:
        load_key(path)
    text = str(caught.value)
    assert "\n" not in text and "\r" not in text, f"more than one line: {text!r}"
    assert str(path) in text, f"path not named: {text!r}"
    return text


# --- generate_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "size"), [(256, 32), (512, 64)])
def test_generate_key_sizes(bits: int, size: int) -> None:
    keys = {generate_key(bits) for _ in range(8)}
    assert {len(key) for key in keys} == {size}
    assert len(keys) == 8  # random, not a constant


def test_generate_key_default_is_512_bits() -> None:
    assert len(generate_key()) == 64


@pytest.mark.parametrize("bits", [0, 128, 255, 257, 384, 1024, -256])
def test_generate_key_rejects_other_sizes(bits: int) -> None:
    with pytest.raises(ValueError, match="256 or 512"):
        generate_key(bits)


# --- write_key_file --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_write_key_file_is_0600_under_umask_0(
    tmp_path: Path, permissive_umask: None, size: int
) -> None:
    key = generate_key(size * 8)
    path = write_key_file(tmp_path / "user.key", key)
    assert path == tmp_path / "user.key"
    assert mode_of(path) == 0o600
    assert path.read_text("ascii") == base64.b64encode(key).decode() + "\n"
    assert load_key(path) == key


def test_write_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "user.key", generate_key())
    before = path.read_bytes()
    with pytest.raises(KeyFileError) as caught:
        write_key_file(path, generate_key())
    text = str(caught.value)
    assert str(path) in text and "already exists" in text and "\n" not in text
    assert path.read_bytes() == before


def test_write_key_file_overwrite_replaces_and_tightens_mode(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = write(tmp_path / "user.key", b"old contents, much longer than any key file line" * 9)
    path.chmod(0o644)
    key = generate_key(256)
    assert write_key_file(path, key, overwrite=True) == path
    assert mode_of(path) == 0o600
    assert load_key(path) == key


def test_write_key_file_into_missing_directories_makes_them_private(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "user.key"
    key = generate_key()
    write_key_file(path, key)
    assert load_key(path) == key
    for folder in (tmp_path / "no", tmp_path / "no" / "such", path.parent):
        assert mode_of(folder) == 0o700, folder


def test_write_key_file_below_a_file_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    write(tmp_path / "plain", b"a file, not a folder")
    path = tmp_path / "plain" / "dir" / "user.key"
    with pytest.raises(KeyFileError) as caught:
        write_key_file(path, generate_key())
    assert str(caught.value) == (
        f"key file {path}: cannot create its folder {tmp_path / 'plain' / 'dir'}: Not a directory"
    )


def test_write_key_file_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    key = generate_key()
    assert write_key_file("~/user.key", key) == tmp_path / "user.key"
    assert load_key("~/user.key") == key


# --- load_key --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_load_key_round_trip(tmp_path: Path, size: int) -> None:
    key = generate_key(size * 8)
    path = write_key_file(tmp_path / "user.key", key)
    assert load_key(path) == key
    assert load_key(str(path)) == key


@pytest.mark.parametrize(
    "layout",
    [
        lambda text: text,
        lambda text: text + "\n",
        lambda text: text + "\r\n",
        lambda text: f"  {text}  \n\n",
        lambda text: f"{text[:20]}\n{text[20:]}\n",
    ],
    ids=["bare", "newline", "crlf", "padded", "wrapped"],
)
def test_load_key_tolerates_whitespace(tmp_path: Path, layout: Callable[[str], str]) -> None:
    key = generate_key()
    path = write(tmp_path / "user.key", layout(encode_key(key)).encode())
    assert load_key(path) == key


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in load_error(tmp_path / "absent.key")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "a-directory"
    path.mkdir(mode=0o700)
    assert "not a regular file" in load_error(path)


def test_device_is_refused() -> None:
    """/dev/null opens and reads without blocking, but holds no key: refused by type."""
    assert "not a regular file" in load_error(Path("/dev/null"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o700 | 0o020])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "user.key", (encode_key(generate_key()) + "\n").encode(), mode)
    text = load_error(path)
    assert f"chmod 600 {path}" in text
    assert f"{mode:04o}" in text


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    key = generate_key()
    path = write(tmp_path / "user.key", encode_key(key).encode(), mode)
    assert load_key(path) == key


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (base64.b64encode(bytes(16)) + b"\n", "16 bytes"),
        (base64.b64encode(bytes(48)) + b"\n", "48 bytes"),
        (base64.b64encode(bytes(31)) + b"\n", "31 bytes"),
        (base64.b64encode(bytes(65)) + b"\n", "65 bytes"),
        (b"", "0 bytes"),
        (b"\n\n", "0 bytes"),
        (b"this is not a key, it is a sentence\n", "not a base64 key"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\n", "not a base64 key"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 16) + b"\n", "not a base64 key"),
        (base64.b64encode(bytes(64)).rstrip(b"=")[:-1] + b"\n", "not a base64 key"),
        (bytes(range(256)), "not a base64 key"),
        (b"\xff\xfe\x00\x01garbage\x80\x81", "not a base64 key"),
        (b"\x00" * 64, "not a base64 key"),
    ],
    ids=[
        "16-byte-key",
        "48-byte-key",
        "31-byte-key",
        "65-byte-key",
        "empty",
        "blank-lines",
        "text",
        "ssh-key",
        "urlsafe-alphabet",
        "truncated",
        "binary",
        "binary-non-ascii",
        "nul-bytes",
    ],
)
def test_bad_contents(tmp_path: Path, content: bytes, words: str) -> None:
    path = write(tmp_path / "user.key", content)
    text = load_error(path)
    assert words in text
    assert "knock keygen" in text


def test_decode_key_names_its_source() -> None:
    with pytest.raises(KeyFileError, match="^users.toml: alice: not a base64 key"):
        decode_key("!!!", "users.toml: alice")
    assert decode_key(encode_key(bytes(32))) == bytes(32)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is not a regular file: load_key must say so, not wait for a writer forever."""
    path = tmp_path / "user.key"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(load_key(path))
        except BaseException as error:  # handed over to the test's thread
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=2)
    blocked = worker.is_alive()
    if blocked:  # release the reader by opening and closing the write end
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
    assert not blocked, "load_key blocked opening a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], KeyFileError), outcome
    assert "not a regular file" in str(outcome[0])


def test_oversized_file_is_refused_not_truncated(tmp_path: Path) -> None:
    # A valid key followed by megabytes of anything is not a key file.
    content = base64.b64encode(bytes(64)) + b"\n" + b"A" * 8192
    text = load_error(write(tmp_path / "user.key", content))
    assert "larger than 4096 bytes" in text
