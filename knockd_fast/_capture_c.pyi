"""Stubs for the Cython capture engine (_ext/capture.pyx); the API is in docs/capture.md."""

import ipaddress
import os
from collections.abc import Iterable

import numpy as np

from knock_client.protocol import KnockLayout
from knockd_fast.capture_spec import Admission
from knockd_fast.capture_spec import CaptureError as CaptureError

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | str

class CaptureEngine:
    knock_timeout: float
    live: bool
    group_by: str  # capture_spec.GROUP_BY: "address+port" or "address"
    admission: Admission
    def __init__(
        self,
        layout: KnockLayout,
        knock_timeout: float = 10.0,
        capacity: int = 65536,
        ring_capacity: int = 4096,
        destinations: Iterable[_Address] = (),
        group_by: str = "address+port",
        knock_mode: bool = True,
        spa_mode: bool = True,
        user_ids: Iterable[int] | None = None,
    ) -> None: ...
    def admit(
        self, knock_mode: bool = True, spa_mode: bool = True, user_ids: Iterable[int] | None = None
    ) -> None: ...
    def open_file(self, path: str | os.PathLike[str], bpf: bool = False) -> None: ...
    def open_live(
        self,
        interface: str,
        buffer_bytes: int = ...,
        timeout_ms: int = ...,
        snaplen: int = ...,
        bpf: bool = True,
        immediate: bool = False,
    ) -> None: ...
    @property
    def filter_expression(self) -> str: ...
    @property
    def linktype(self) -> int | None: ...
    def fileno(self) -> int: ...
    def set_nonblocking(self, flag: bool = True) -> None: ...
    def close(self) -> None: ...
    def dispatch(self, max_packets: int = -1) -> int: ...
    def drain(self) -> np.ndarray: ...
    def forget(self, address: _Address, port: int = 0) -> None: ...
    def active_sources(self) -> int: ...
    def stats(self) -> dict[str, int]: ...

def bare_dispatch(path: str | os.PathLike[str]) -> tuple[int, float]: ...
def debug_build() -> bool: ...
def libpcap_version() -> str: ...
