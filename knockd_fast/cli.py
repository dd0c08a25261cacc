"""``knockd-fast run|replay|status|check-config|version``.

Every failure to start is one line on stderr and a non-zero exit (2: the configuration,
1: the machine: interface, firewall, capture file), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

from knockd_fast import __version__

from .config import Config, ConfigError, load_config

EXIT_FAILURE = 1
EXIT_CONFIG = 2
log = logging.getLogger("knockd_fast")


def _libpcap_version() -> str:
    """libpcap's version as the Cython extension reports it, or why there is none."""
    from . import _capture  # the one place that decides which twin is in use

    if _capture.IMPLEMENTATION != "cython":
        return "libpcap: extension not built"
    from . import _capture_c

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


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    layout = config.knock.layout
    print(
        f"{config.path}: ok: {len(config.users)} users, knock range from {layout.base_port} "
        f"at {layout.digit_bits} bits, spa port {layout.spa_port}, modes "
        f"{','.join(sorted(config.knock.modes))}, "
        f"interface{'s' if len(config.capture.interfaces) > 1 else ''} {config.capture.label}, "
        f"backend {config.grants.backend}"
    )
    return 0


def _firewall(config: Config, **options):
    from .firewall import create

    return create(config.grants.backend, config.grants.chain, config.grants.hooks, **options)


def _cmd_run(args: argparse.Namespace) -> int:
    from ._capture import IMPLEMENTATION, CaptureError
    from .daemon import Doorman, StartError, open_captures, protected_destinations
    from .firewall.base import FirewallError
    from .replay import ReplayCache

    config = load_config(args.config)
    if IMPLEMENTATION != "cython":
        raise StartError(
            "live capture needs the Cython extension (this install has only "
            "the pure-Python engine, which reads capture files)"
        )
    try:
        destinations = protected_destinations(config)
        captures = open_captures(config, destinations)
        # The firewall worker logs every action; the dry run's own lines go to debug.
        dry = {"level": logging.DEBUG, "history": 0} if config.grants.backend == "dry-run" else {}
        firewall = _firewall(config, **dry)
        firewall.setup()
        kept, removed = firewall.reconcile(int(time.time()))
    except (CaptureError, FirewallError) as error:
        raise StartError(str(error)) from None
    replay = ReplayCache.for_state_dir(config.state_dir, now=time.time())
    doorman = Doorman(config, captures, firewall, replay, json_log=args.json)
    log.info(
        "knockd-fast %s on %s protecting %s; %d users; grants kept %d, expired %d",
        __version__,
        config.capture.label,
        ", ".join(map(str, destinations)) or "any address",
        len(config.users),
        len(kept),
        len(removed),
    )
    doorman.install_signal_handlers()
    try:
        doorman.run()
    finally:
        replay.close()
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from ._capture import CaptureError
    from .daemon import REPLAY_JSON_KEYS, replay_capture

    config = load_config(args.config, load_keys=True)

    def show(decision) -> None:
        if args.json:
            fields = decision.as_json()
            print(json.dumps({key: fields[key] for key in REPLAY_JSON_KEYS}))
        else:
            print(decision.as_text())

    try:
        stats = replay_capture(config, args.capture, show)
    except CaptureError as error:
        raise _Failure(str(error)) from None
    summary = " ".join(
        f"{key}={value}" for key, value in stats.items() if not key.startswith("pcap_")
    )
    print(f"knockd-fast replay: {summary}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .daemon import describe_grants
    from .firewall.base import FirewallError

    config = load_config(args.config, load_keys=False)
    if config.grants.backend == "dry-run":
        print("backend dry-run: no grants are kept in a firewall")
        return 0
    try:
        grants = _firewall(config).grants()
    except FirewallError as error:
        raise _Failure(str(error)) from None
    lines = describe_grants(grants, time.time())
    print("\n".join(lines) if lines else "no live grants")
    return 0


class _Failure(Exception):
    """A run-time failure reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="knockd-fast", description="Port-knocking doorman.")
    parser.add_argument("--version", action="version", version=f"knockd-fast {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    version = sub.add_parser("version", help="versions of knockd-fast, knock-client, libpcap")
    version.set_defaults(func=_cmd_version)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "-c", "--config", required=True, metavar="FILE", help="configuration file (TOML)"
        )
        return command

    run = with_config("run", "run the daemon")
    run.add_argument("--json", action="store_true", help="decisions as JSON lines")
    run.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_run)

    replay = with_config("replay", "judge the knocks in a capture file; touch no firewall")
    replay.add_argument("capture", metavar="CAPTURE", help="pcap or pcapng file")
    replay.add_argument("--json", action="store_true", help="one JSON object per decision")
    replay.set_defaults(func=_cmd_replay)

    status = with_config("status", "live grants and their remaining time")
    status.set_defaults(func=_cmd_status)

    check = with_config("check-config", "load the configuration and the keys, and say why not")
    check.set_defaults(func=_cmd_check_config)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    # A line per decision and per firewall action: skip what no format here uses (the
    # caller's file and line is a walk up the stack per record; see the logging HOWTO,
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger("knockd_fast")
    root.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    if getattr(args, "syslog", False):
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter(f"knockd-fast[{os.getpid()}]: %(message)s"))
    elif getattr(args, "func", None) is _cmd_run:
        from .daemon import TurnFlushedHandler

        handler = TurnFlushedHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    from .daemon import StartError

    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"knockd-fast: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (StartError, _Failure) as error:
        print(f"knockd-fast: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
