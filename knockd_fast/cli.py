"""Command line of the daemon: `knockd-fast SUBCOMMAND`."""

from __future__ import annotations

import argparse
import os
from importlib import metadata

from knockd_fast import __version__


def _libpcap_version() -> str:
    """libpcap's version as the Cython extension reports it, or why there is none."""
    if os.environ.get("KNOCKD_FAST_NO_EXTENSIONS", "") not in ("", "0"):
        return "libpcap: extension not built"
    try:
        from knockd_fast import _capture_c
    except ImportError:
        return "libpcap: extension not built"
    return _capture_c.libpcap_version()


def _knock_client_version() -> str:
    try:
        return metadata.version("knock-client")
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd_version(args: argparse.Namespace) -> int:
    client = _knock_client_version()
    print(f"knockd-fast {__version__}, knock-client {client}, {_libpcap_version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knockd-fast", description="Port-knocking daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="print versions of knockd-fast, knock-client, libpcap")
    version.set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
