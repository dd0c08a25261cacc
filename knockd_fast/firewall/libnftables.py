"""A small ctypes binding of libnftables (Debian's ``libnftables1``): the seven calls we use.

Why our own binding and not Debian's ``python3-nftables``: that package installs into the
system Python's ``dist-packages`` only, so the daemon's virtualenv and a pip install cannot
import it, and it is not on PyPI. It is itself a thin ctypes wrapper around the same
library; the part we need is these calls, with the library loaded by its soname
(``libnftables.so.1``), so the only requirement is the shared library.

Commands go in, and listings come out, as libnftables' JSON (``nft -j``): structured, so
nothing we write is ever quoted or parsed as nft syntax. Each ``Nft`` is one libnftables
context; ``run`` hands one buffer to ``nft_run_cmd_from_buffer``, which commits it as one
kernel transaction (all or nothing). A context caches what it has read: keep one context
for writes and another for reads (listing a large set on the writing context slows every
later add badly).
"""

from __future__ import annotations

import ctypes as ct
import json
from typing import Any

SONAME = "libnftables.so.1"

# enum nft_output_flags (nftables/libnftables.h)
OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4
OUTPUT_TERSE = 1 << 11  # listings leave set elements out


class NftError(Exception):
    """libnftables refused a command; ``str()`` is its first error line."""


_lib: Any = None


def load() -> Any:
    """The library, loaded once; ``NftError`` (one line) if it is not installed."""
    global _lib
    if _lib is None:
        try:
            lib = ct.CDLL(SONAME, use_errno=True)
        except OSError:
            raise NftError(
                f"{SONAME} not found: install Debian's libnftables1 (apt-get install libnftables1)"
            ) from None
        lib.nft_ctx_new.restype = ct.c_void_p
        lib.nft_ctx_new.argtypes = [ct.c_uint32]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ct.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ct.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ct.c_void_p, ct.c_char_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).restype = ct.c_int
            getattr(lib, name).argtypes = [ct.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).restype = ct.c_char_p
            getattr(lib, name).argtypes = [ct.c_void_p]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ct.c_void_p, ct.c_uint]
        _lib = lib
    return _lib


class Nft:
    """One libnftables context, JSON in and out, output and errors buffered."""

    def __init__(self, flags: int = 0) -> None:
        self._lib = load()
        self._ctx = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        self._lib.nft_ctx_buffer_output(self._ctx)
        self._lib.nft_ctx_buffer_error(self._ctx)
        self._flags = -1
        self.set_flags(flags)

    def set_flags(self, flags: int) -> None:
        """Output flags; JSON always (it also makes the parser take JSON input)."""
        flags |= OUTPUT_JSON
        if flags != self._flags:
            self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            self._flags = flags

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``commands`` (libnftables JSON command objects) as one transaction; the
        objects of the output (listings), without the metainfo."""
        text = json.dumps({"nftables": commands}, separators=(",", ":"))
        return self.run_text(text)

    def run_text(self, text: str) -> list[dict[str, Any]]:
        if self._ctx is None:
            raise NftError("context already closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(_first_error(err.decode("utf-8", "replace")) or f"failed (rc {rc})")
        if not out.strip():
            return []
        items = json.loads(out)["nftables"]
        return [item for item in items if "metainfo" not in item]

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line[line.index("Error:") :]
    return lines[0] if lines else ""
