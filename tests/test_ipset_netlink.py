"""Our ipset encoder (knockd_fast.firewall.ipset_netlink) builds what pyroute2 builds.

No kernel here: pyroute2's own ``AsyncIPSet.add``/``delete``/``test`` run with its request
call captured, and its message, encoded with the same header, must equal ours byte for
byte. The kernel side (batches landing, failures mapped to their change) is in
tests/test_ipset.py.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.ipset import AsyncIPSet, PortEntry
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET

from knockd_fast.firewall import ipset_netlink as nl
from knockd_fast.firewall.base import Grant, format_comment
from knockd_fast.firewall.ipset import IpsetFirewall

PROTOCOL = 7  # what kernels since 4.x answer to IPSET_CMD_PROTOCOL
SEQ = 41


def pyroute2_message(method: str, *args, **kwargs) -> bytes:
    """The bytes pyroute2 0.9 sends for ``AsyncIPSet.<method>(*args, **kwargs)``."""
    ipset = AsyncIPSet.__new__(AsyncIPSet)  # no socket: only its message building
    ipset._proto_version, ipset._nfgen_family = PROTOCOL, socket.AF_INET
    sent = []

    async def request(msg, msg_type, msg_flags, terminate=None):
        sent.append((msg, msg_type, msg_flags))

    ipset.request = request
    asyncio.run(getattr(ipset, method)(*args, **kwargs))
    ((msg, msg_type, flags),) = sent
    msg["nfgen_family"] = ipset._nfgen_family  # as request_iter sets them
    msg["header"]["type"] = msg_type | NFNL_SUBSYS_IPSET << 8
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = SEQ
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def ours(cmd: int, flags: int, name: str, data: bytes) -> bytes:
    attrs = nl.body(nl.set_prefix(PROTOCOL, name), data)
    return nl.message(cmd, NLM_F_REQUEST | NLM_F_ACK | flags, SEQ, attrs)


def pyroute2_entry(source, port: int, proto: int, destination) -> tuple[tuple, str, int]:
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    if destination is None:
        return (str(source), PortEntry(port, proto)), "ip,port", family
    return (str(source), PortEntry(port, proto), str(destination)), "ip,port,ip", family


addresses = st.one_of(
    st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)),
)
comments = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=80)


@settings(max_examples=200, deadline=None)
@given(
    source=addresses,
    port=st.integers(0, 65535),
    proto=st.sampled_from([6, 17]),
    bound=st.booleans(),
    exclusive=st.booleans(),
    timeout=st.integers(0, 2_147_483),  # up to IPSET_MAX_TIMEOUT
    comment=comments,
    name=st.sampled_from(["knockd-fast-v4", "knockd-fast-v6-any", "x", "kf_test.v4"]),
)
def test_add_is_pyroute2s_message(source, port, proto, bound, exclusive, timeout, comment, name):
    destination = type(source)(int(source) ^ 1) if bound else None
    entry, etype, family = pyroute2_entry(source, port, proto, destination)
    theirs = pyroute2_message(
        "add", name, entry, family=family, etype=etype, exclusive=exclusive,
        timeout=timeout, comment=comment,
    )  # fmt: skip
    data = nl.entry_key(source, port, proto, destination) + nl.entry_extensions(timeout, comment)
    assert ours(nl.IPSET_CMD_ADD, nl.NLM_F_EXCL if exclusive else 0, name, data) == theirs


@settings(max_examples=100, deadline=None)
@given(source=addresses, port=st.integers(0, 65535), bound=st.booleans())
def test_del_and_test_are_pyroute2s_messages(source, port, bound) -> None:
    destination = type(source)(int(source) ^ 1) if bound else None
    entry, etype, family = pyroute2_entry(source, port, 17, destination)
    key = nl.entry_key(source, port, 17, destination)
    # delete: exclusive (pyroute2's default), so that the kernel says when it was not there
    theirs = pyroute2_message("delete", "s", entry, family=family, etype=etype)
    assert ours(nl.IPSET_CMD_DEL, nl.NLM_F_EXCL, "s", key) == theirs
    theirs = pyroute2_message("test", "s", entry, family=family, etype=etype)
    assert ours(nl.IPSET_CMD_TEST, 0, "s", key) == theirs


@pytest.mark.parametrize(
    ("source", "destination"), [("192.0.2.2", "192.0.2.1"), ("2001:db8::2", None)]
)
def test_the_backends_add_is_what_it_sent_through_pyroute2(source, destination) -> None:
    """The backend's request for a grant: pyroute2's add with the grant's comment and the
    timeout the backend computes (as ``_add`` called pyroute2 before)."""
    fw = IpsetFirewall(clock=lambda: 1_000.0)
    dest = None if destination is None else ip_address(destination)
    grant = Grant(ip_address(source), "tcp", 22, dest, 1_300, "zoë o'brien")
    name, key = fw._entry(grant.key)
    fw._prefixes[name] = nl.set_prefix(PROTOCOL, name)
    data = key + nl.entry_extensions(fw._timeout(grant), format_comment(grant))
    entry, etype, family = pyroute2_entry(grant.source, 22, 6, dest)
    theirs = pyroute2_message(
        "add", name, entry, family=family, etype=etype, exclusive=True, timeout=300,
        comment=format_comment(grant),
    )  # fmt: skip
    request = nl.message(nl.IPSET_CMD_ADD, NLM_F_REQUEST | NLM_F_ACK | nl.NLM_F_EXCL, SEQ,
                         fw._body(name, data))  # fmt: skip
    assert request == theirs
