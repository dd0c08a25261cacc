"""Interface discovery: the local addresses the capture protects.

``capture.destinations`` if set, else the addresses of the capture interfaces, asked of
iproute2 once at start.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess

from .capture_spec import MAX_DESTINATIONS
from .config import Config, IPAddress
from .errors import StartError

log = logging.getLogger("knockd_fast")


def interface_addresses(interface: str) -> list[IPAddress]:
    """The addresses of ``interface`` (all interfaces for ``any``), from iproute2."""
    argv = ["ip", "-j", "address", "show"] + ([] if interface == "any" else ["dev", interface])
    try:
        listing = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10)
        entries = json.loads(listing.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        raise StartError(f"interface {interface}: cannot list its addresses: {detail}") from None
    found = []
    for entry in entries:
        for info in entry.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if address not in found:
                found.append(address)
    return found


def protected_destinations(config: Config) -> list[IPAddress]:
    """``capture.destinations``, or the union of the addresses of every capture interface."""
    if config.capture.destinations:
        return list(config.capture.destinations)
    found: list[IPAddress] = []
    for interface in config.capture.interfaces:
        found += [a for a in interface_addresses(interface) if a not in found]
    if len(found) > MAX_DESTINATIONS:
        log.warning(
            "capture: %d addresses on %s; protecting the first %d (set capture.destinations)",
            len(found),
            config.capture.label,
            MAX_DESTINATIONS,
        )
    return found[:MAX_DESTINATIONS]
