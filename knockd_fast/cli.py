"""``knockd-fast run|replay|status|check-config|bench|user|version``.

Every failure to start is one line on stderr and a non-zero exit (2: the configuration,
1: the machine: interface, firewall, capture file), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from knockd_fast import __version__

from .benchmark import WORKLOAD_NAMES
from .config import Config, ConfigError, load_config
from .errors import StartError
from .logs import Event, flush_logs, json_line, setup_logging

if TYPE_CHECKING:
    from .metrics import MetricsPublisher

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3  # `status`: no daemon runs on the configuration's state directory
EXIT_STATUS_UNKNOWN = 4  # `status`: cannot tell (the lock file cannot be read)
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
    from .firewall.coexistence import mismatch

    warning = mismatch(config.grants.backend, config.grants.nft_table)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    from .preflight import host_warnings

    for line in host_warnings(config):
        print(f"warning: {config.path}: {line}", file=sys.stderr)
    for line in fleet_lines(config):
        print(line, file=sys.stderr)
    return 0


# Per-flow ECMP hashes each packet's 5-tuple: a knock's packets (one port each) scatter
# over the gateways, and no gateway sees a whole knock. Packets are not shipped between
# gateways (that would let anyone who can reach one gateway feed the others).
KNOCK_MODE_IN_A_FLEET = (
    "knock mode (syn, udp) needs every packet of one knock at one gateway: it works behind "
    "an HA pair (one gateway active at a time) or a balancer that hashes on the source "
    "address only; behind per-flow ECMP or anycast a knock's packets are scattered over "
    'the gateways and it fails: there use single-packet mode only (knock.modes = ["spa"]), '
    "which every gateway judges alone"
)


def fleet_lines(config: Config) -> list[str]:
    """What ``check-config`` (and the start) say of ``[fleet]``."""
    fleet = config.fleet
    if not fleet.enabled:
        return []
    from .fleet import redis_address

    where = redis_address(fleet.url)
    tls = "TLS" if fleet.url.startswith("rediss://") else "no TLS"
    lines = [
        f"fleet: gateway {fleet.gateway} shares claims and grants through redis at {where} "
        f"({tls}); while it is unreachable: {fleet.on_unavailable}"
    ]
    if config.knock.knock_mode:
        lines.append(f"note: {config.path}: fleet: {KNOCK_MODE_IN_A_FLEET}")
    return lines


def _cmd_run(args: argparse.Namespace) -> int:
    from ._capture import IMPLEMENTATION, CaptureError
    from .daemon import Doorman, open_captures, tune_garbage_collector
    from .firewall import registry
    from .firewall.base import FirewallError
    from .interfaces import protected_destinations
    from .replay import ReplayCache
    from .sinks import LogSink
    from .statelock import StateLock, describe_error

    config = load_config(args.config)
    if IMPLEMENTATION != "cython":
        raise StartError(
            "live capture needs the Cython extension (this install has only "
            "the pure-Python engine, which reads capture files)"
        )
    from .firewall.coexistence import mismatch

    warning = mismatch(config.grants.backend, config.grants.nft_table)
    if warning:
        log.warning("%s", warning)
    # Before anything touches the firewall: a second daemon on this state directory would
    # judge and grant every knock a second time. Held until the process ends. A state
    # directory that cannot hold the lock file is what the replay cache copes with too
    # (it goes on in memory): so do we, and say what is lost.
    lock = None
    try:
        lock = StateLock.acquire(config.state_dir)
    except OSError as error:
        log.warning(
            "cannot lock state directory %s (%s): a second knockd-fast on it would not be "
            "refused, and status cannot tell whether this one runs",
            config.state_dir,
            describe_error(error),
        )
    publisher = _metrics_publisher(config, IMPLEMENTATION)  # before the firewall is touched
    try:
        destinations = protected_destinations(config)
        captures = open_captures(config, destinations)
        firewall = registry.create(config.grants)
        firewall.setup()
        kept, removed = firewall.reconcile(int(time.time()))
    except (CaptureError, FirewallError) as error:
        if lock is not None:
            lock.release()
        raise StartError(str(error)) from None
    replay = ReplayCache.for_state_dir(config.state_dir, time.time(), config.knock.window)
    doorman = Doorman(
        config,
        captures,
        firewall,
        replay,
        sinks=[LogSink(as_json=args.json)],
        grants=kept,
        publisher=publisher,
        destinations=destinations,
    )
    protecting = ", ".join(map(str, destinations)) or "any address"
    text = (
        f"knockd-fast {__version__} on {config.capture.label} protecting {protecting}; "
        f"{len(config.users)} users; grants kept {len(kept)}, expired {len(removed)}"
    )
    log.info(
        Event(
            text,
            "start",
            version=__version__,
            pid=os.getpid(),
            interfaces=list(config.capture.interfaces),
            destinations=[str(address) for address in destinations],
            users=len(config.users),
            backend=config.grants.backend,
            grants_kept=len(kept),
            grants_expired=len(removed),
        )
    )
    for line in fleet_lines(config):
        log.info(line)
    doorman.install_signal_handlers()
    tune_garbage_collector()
    try:
        doorman.run()
    finally:
        replay.close()
        if lock is not None:
            lock.release()
    return 0


def _metrics_publisher(config: Config, implementation: str) -> MetricsPublisher:
    """The metrics' outlets, the endpoint listening already (a taken port stops the start)."""
    from .metrics import MetricsPublisher

    build = {
        "version": __version__,
        "knock_client": _knock_client_version(),
        "libpcap": _libpcap_version().removeprefix("libpcap version "),
        "engine": implementation,
    }
    publisher = MetricsPublisher(config.metrics, config.state_dir, build)
    try:
        publisher.start()
    except OSError as error:
        raise StartError(
            f"{config.path}: metrics.listen: cannot listen on {config.metrics.listen_text}: "
            f"{error.strerror or error}"
        ) from None
    if config.metrics.listen is not None:
        log.info("metrics: http://%s/metrics", config.metrics.listen_text)
    return publisher


def _cmd_replay(args: argparse.Namespace) -> int:
    from ._capture import CaptureError
    from .judging import replay_capture
    from .sinks import PrintSink

    config = load_config(args.config, load_keys=True)
    # A knock refused live may be accepted here after a reload added its port, and the
    # other way round: the reader must know which configuration judged.
    print(
        f"knockd-fast replay: judging with the configuration as it is now ({config.path}: "
        "users, keys, allow, caps), not as it was when the packets were captured",
        file=sys.stderr,
    )
    try:
        stats = replay_capture(config, args.capture, [PrintSink(as_json=args.json)])
    except CaptureError as error:
        raise _Failure(str(error)) from None
    summary = " ".join(
        f"{key}={value}" for key, value in stats.items() if not key.startswith("pcap_")
    )
    print(f"knockd-fast replay: {summary}", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark

    names = tuple(dict.fromkeys(n for n in args.workloads.split(",") if n))
    unknown = [n for n in names if n not in benchmark.WORKLOADS]
    if unknown or not names:
        raise _Failure(
            f"unknown workload {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(benchmark.WORKLOAD_NAMES)}"
        )
    if not 0 < args.scale <= 100:
        raise _Failure(f"--scale {args.scale:g}: give a number above 0, at most 100")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Failure("--plot needs matplotlib: pip install matplotlib") from None
    report = benchmark.run(args.config, names, args.scale, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(benchmark.format_report(report))
    if args.plot:
        benchmark.plot_report(report, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .firewall import registry
    from .firewall.base import FirewallError
    from .metrics import STATE_FILE, read_published
    from .statelock import describe_error, running_pid
    from .status import counters_json, counters_lines, describe_grants, grants_json, running_line

    config = load_config(args.config, load_keys=False)
    try:
        pid: int | None = running_pid(config.state_dir)
        unknown = None
    except OSError as error:
        pid, unknown = None, describe_error(error)
    backend = config.grants.backend
    try:
        firewall = registry.create(config.grants)
        grants = firewall.grants() if firewall.persistent else None
    except FirewallError as error:
        raise _Failure(str(error)) from None
    counters_path = config.state_dir / STATE_FILE
    try:
        published = read_published(counters_path)
        unreadable = None
    except (OSError, ValueError) as error:  # not ours to crash on: say so, show the rest
        published, unreadable = None, f"counters: cannot read {counters_path}: {error}"
    now = time.time()
    if args.json:
        print(json.dumps({
            "running": pid is not None if unknown is None else None,
            "pid": pid or None,
            "state_directory": str(config.state_dir),
            "backend": backend,
            "grants": grants_json(grants, now) if grants is not None else None,
            "counters": counters_json(published, now),
        }, indent=2))  # fmt: skip
    else:
        print(running_line(pid, unknown, config.state_dir, backend, bool(grants)))
        if grants is None:
            print(f"backend {backend}: no grants are kept in a firewall")
        else:
            print("\n".join(describe_grants(grants, now)) or "no live grants")
        counters = [unreadable] if unreadable else counters_lines(
            published, counters_path, now, running=pid is not None
        )  # fmt: skip
        if counters:
            print("\n" + "\n".join(counters))
    # The LSB status codes: 0 running, 3 not running, 4 unknown.
    if unknown is not None:
        return EXIT_STATUS_UNKNOWN
    return 0 if pid is not None else EXIT_NOT_RUNNING


def _fail(text: str, as_json: bool) -> None:
    """The one line of a failed command, on standard error."""
    flush_logs()  # the lines logged before it come first
    print(json_line("error", text, event="exit") if as_json else text, file=sys.stderr)


def _cmd_user_add(args: argparse.Namespace) -> int:
    from .enrol import add_user, handout

    allow = [spec.strip() for item in args.allow for spec in item.split(",") if spec.strip()]
    source = int(args.source) if args.source.isascii() and args.source.isdigit() else args.source
    config, user = add_user(args.config, args.name, allow, source, args.id, args.key_file)
    print(handout(config, user, args.host, args.profile), end="")
    print(
        f"knockd-fast: added user {user.name!r} (id {user.id}) to {config.path.name}, key in "
        f"{user.key_file} (mode 0600); hand the text above to them over a channel you "
        "trust. A running daemon takes the user on `systemctl reload knockd-fast` (SIGHUP)",
        file=sys.stderr,
    )
    return 0


def _cmd_user_remove(args: argparse.Namespace) -> int:
    from .enrol import remove_user

    removal = remove_user(args.config, args.name, keep_key=args.keep_key)
    print(
        f"knockd-fast: removed user {args.name!r} (id {removal.user.id}); "
        f"{removal.key_file_note}. A running daemon closes their grants on "
        "`systemctl reload knockd-fast` (SIGHUP)",
        file=sys.stderr,
    )
    return 0


def _cmd_user_list(args: argparse.Namespace) -> int:
    from .enrol import list_users

    rows = list_users(args.config)
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
        return 0
    table = [("NAME", "ID", "ALLOW", "SOURCE", "KEY FILE", "KEY")]
    table += [
        (r.name, str(r.id), ",".join(r.allow) or "-", r.source, r.key_file, r.key_state)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
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

    status = with_config("status", "whether the daemon runs; live grants and their remaining time")
    status.add_argument("--json", action="store_true", help="the same as one JSON object")
    status.set_defaults(func=_cmd_status)

    bench = sub.add_parser(
        "bench",
        help="measure this machine: synthetic workloads through the engine and the judge",
        description="Synthetic workloads (no traffic, no root) through the real capture "
        "engine and judge: packets/s against libpcap's bare loop, completions and accepted "
        "knocks per second, CPU per packet and per knock, peak memory.",
    )
    bench.add_argument(
        "-c", "--config", metavar="FILE",
        help="use this configuration's layout, users (the first user's key knocks) and table "
        "size; default: a built-in one",
    )  # fmt: skip
    bench.add_argument(
        "--workloads", default=",".join(WORKLOAD_NAMES), metavar="LIST",
        help=f"comma-separated, of {','.join(WORKLOAD_NAMES)} (default: all)",
    )  # fmt: skip
    bench.add_argument(
        "--scale", type=float, default=1.0, help="multiply every workload's size (default 1)"
    )
    bench.add_argument("--json", action="store_true", help="the report as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the report (matplotlib)")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    check = with_config("check-config", "load the configuration and the keys, and say why not")
    check.set_defaults(func=_cmd_check_config)

    user = sub.add_parser("user", help="enrol, list or remove users ([[users]] of the config)")
    user_sub = user.add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser
    )
    add = user_sub.add_parser("add", help="make a key, add the user, print what to hand them")
    add.add_argument("name", metavar="NAME", help="the user's name (unique; in logs and rules)")
    add.add_argument(
        "--allow", action="append", required=True, metavar="PORT/PROTO[,...]",
        help="what they may open, e.g. 22/tcp (repeatable)",
    )  # fmt: skip
    add.add_argument(
        "--source", default="exact", metavar="exact|any|N",
        help="how their claimed address must match the real one (default exact)",
    )  # fmt: skip
    add.add_argument("--id", type=int, metavar="N", help="user id (default: the lowest free)")
    add.add_argument(
        "--key-file", metavar="FILE",
        help="the server's copy of their key, relative to the config (default keys/NAME.key)",
    )  # fmt: skip
    add.add_argument("--host", help="this server's name or address, for their profile")
    add.add_argument("--profile", metavar="NAME", help="their profile's name (default from --host)")
    add.set_defaults(func=_cmd_user_add)
    remove = user_sub.add_parser("remove", help="remove the user and delete their key file")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--keep-key", action="store_true", help="leave their key file in place")
    remove.set_defaults(func=_cmd_user_remove)
    listing = user_sub.add_parser("list", help="users, what they may open, their key files")
    listing.add_argument("--json", action="store_true", help="as a JSON array")
    listing.set_defaults(func=_cmd_user_list)
    for command in (add, remove, listing):
        command.add_argument(
            "-c", "--config", required=True, metavar="FILE", help="configuration file (TOML)"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `run --json`: every line of the log is a JSON object (the other commands' --json is
    # their report on standard output; their few log lines stay text).
    json_log = args.func is _cmd_run and args.json
    setup_logging(
        verbose=getattr(args, "verbose", False),
        syslog=getattr(args, "syslog", False),
        per_turn=args.func is _cmd_run,
        as_json=json_log,
    )
    try:
        return args.func(args)
    except ConfigError as error:
        _fail(f"knockd-fast: error: {error}", json_log)
        return EXIT_CONFIG
    except (StartError, _Failure) as error:
        _fail(f"knockd-fast: error: {error}", json_log)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
