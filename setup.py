"""Build the Cython extensions; all other metadata lives in pyproject.toml.

Build-time environment:
  KNOCKD_FAST_NO_EXTENSIONS=1  build no extension (pure-Python install)
  KNOCKD_FAST_DEBUG=1          -O0 -g, Cython line tracing (for coverage/profilers), and
                               KF_DEBUG=1: the capture table's invariant checks
                               (_ext/includes/debug.h)
"""

import os
import shlex
import subprocess

from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("KNOCKD_FAST_NO_EXTENSIONS")
DEBUG = _flag("KNOCKD_FAST_DEBUG")


def pkg_config(lib: str, debian_package: str) -> dict[str, list]:
    """Split `pkg-config --cflags --libs` into Extension keyword arguments."""
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags", "--libs", lib],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise SystemExit(
            f"error: `pkg-config --cflags --libs {lib}` failed: {detail.strip()}\n"
            f"Install the Debian packages pkg-config and {debian_package} "
            f"(`make deps`), or build without extensions: KNOCKD_FAST_NO_EXTENSIONS=1"
        ) from None
    kw: dict[str, list] = {
        "include_dirs": [],
        "library_dirs": [],
        "libraries": [],
        "extra_compile_args": [],
    }
    for tok in shlex.split(out):
        key = {"-I": "include_dirs", "-L": "library_dirs", "-l": "libraries"}.get(tok[:2])
        if key:
            kw[key].append(tok[2:])
        else:
            kw["extra_compile_args"].append(tok)
    return kw


def extensions() -> list[Extension]:
    # Imported here so a KNOCKD_FAST_NO_EXTENSIONS build needs neither Cython nor numpy.
    import numpy
    from Cython.Build import cythonize

    pcap = pkg_config("libpcap", "libpcap-dev")
    macros = [("CYTHON_TRACE_NOGIL", "1"), ("KF_DEBUG", "1")] if DEBUG else []
    capture = Extension(
        "knockd_fast._capture_c",
        ["_ext/capture.pyx"],
        include_dirs=["_ext/includes", numpy.get_include(), *pcap["include_dirs"]],
        library_dirs=pcap["library_dirs"],
        libraries=pcap["libraries"],
        define_macros=macros,
        extra_compile_args=[*pcap["extra_compile_args"], *(["-O0", "-g"] if DEBUG else ["-O2"])],
    )
    return cythonize(
        [capture],
        # `cimport pcap` resolves against _ext/includes/pcap.pxd.
        include_path=["_ext/includes"],
        compiler_directives={"language_level": 3, "embedsignature": True, "linetrace": DEBUG},
        # One C output dir per mode: switching debug <-> release never reuses stale C.
        build_dir="build/cython-debug" if DEBUG else "build/cython",
    )


setup(ext_modules=[] if NO_EXTENSIONS else extensions())
