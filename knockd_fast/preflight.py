"""What ``check-config`` says about this host beyond the file: the capture interfaces that
do not exist here, key files the daemon (root) would refuse as another user's, and a
backend whose Python requirement is missing or too old (pyroute2 for ipset).

Warnings, not errors: an interface may be created later (a VPN's, a bridge's), and a check
may run on another machine than the daemon's. Each is one line naming the key.
"""

from __future__ import annotations

import os
import pwd
import socket

from .config import Config
from .firewall.registry import requirement_problem


def host_warnings(config: Config) -> list[str]:
    """One line per finding, each starting with the dotted key it concerns."""
    problem = requirement_problem(config.grants.backend)
    backend = [f"grants.backend: {problem}"] if problem else []
    return [*_interface_warnings(config), *_key_owner_warnings(config), *backend]


def _interface_warnings(config: Config) -> list[str]:
    try:
        present = [name for _, name in socket.if_nameindex()]
    except OSError as error:
        return [f"capture.interface: cannot list this host's interfaces: {error.strerror}"]
    missing = [name for name in config.capture.interfaces if name != "any" and name not in present]
    return [
        f"capture.interface: no interface {name!r} here (this host has: {', '.join(present)}); "
        "the daemon will not start until it exists"
        for name in missing
    ]


def _key_owner_warnings(config: Config) -> list[str]:
    """Key files root does not own. The daemon runs as root and refuses a key file another
    user could replace; a check run as that user passes them, so it says so here."""
    found = []
    for index, user in enumerate(config.users.values()):  # in the file's order
        try:
            owner = os.stat(user.key_file).st_uid
        except OSError:
            continue  # loading the keys has said what is wrong with it
        if owner != 0:
            found.append(
                f"users[{index}].key_file: {user.key_file} belongs to {_user_name(owner)}, not "
                f"root: the daemon (root) refuses it; run: chown root {user.key_file}"
            )
    return found


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
