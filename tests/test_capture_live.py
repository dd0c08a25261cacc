"""The Cython engine on a live veth between two namespaces, fed by the real `knock` client."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from netns import CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6

from knock_client.protocol import open_message

# The pure-Python twin reads capture files only.
pytestmark = [pytest.mark.netns, pytest.mark.extension]

HELPER = Path(__file__).with_name("live_capture.py")


def run_capture(server: str, iface: str, out: Path, send) -> dict:
    argv = [
        "ip",
        "netns",
        "exec",
        server,
        sys.executable,
        str(HELPER),
        "--iface",
        iface,
        "--out",
        str(out),
        "--dest",
        SERVER_V4,
        "--dest",
        SERVER_V6,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().strip() if ready else ""
        assert line == "ready", f"capture did not start: {line!r} {proc.stderr.read()}"
        send()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, errors = proc.communicate(timeout=10)
    assert proc.returncode == 0, errors
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["syn", "udp", "spa"])
@pytest.mark.parametrize("family", [4, 6])
def test_knocks_from_the_client_complete_live(
    hosts, mode, family, knock_cmd, knock_env, knock_key, tmp_path
):
    server, client, server_if = hosts
    key_path, key = knock_key
    target, source = (SERVER_V4, CLIENT_V4) if family == 4 else (SERVER_V6, CLIENT_V6)

    def send() -> None:
        for action in ("open", "close"):
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    client,
                    *knock_cmd,
                    action,
                    target,
                    "22/tcp",
                    "--user",
                    "7",
                    "--key-file",
                    str(key_path),
                    "--mode",
                    mode,
                ],
                env=knock_env,
                check=True,
                capture_output=True,
                timeout=30,
            )

    result = run_capture(server, server_if, tmp_path / "out.json", send)
    done = result["completions"]
    assert [c["kind"] for c in done] == [2 if mode == "spa" else 1] * 2, result
    actions = []
    for completion in done:
        assert completion["source"] == source
        assert completion["destination"] == target
        assert completion["family"] == family
        knock = open_message(bytes.fromhex(completion["message"]), key)
        assert str(knock.claimed_ip) == source
        actions.append(str(knock.action))
    assert actions == ["open", "close"]
    stats = result["stats"]
    assert stats["completions"] == 2
    assert stats["pcap_dropped"] == 0
    assert stats["pcap_received"] >= stats["packets"] > 0


def test_unknown_interface_is_one_clear_error():
    from knock_client.protocol import KnockLayout
    from knockd_fast._capture import CaptureEngine, CaptureError

    engine = CaptureEngine(KnockLayout())
    with pytest.raises(CaptureError, match="no-such-if0: no such interface"):
        engine.open_live("no-such-if0")


def test_any_interface_sees_a_knock(hosts, knock_cmd, knock_env, knock_key, tmp_path):
    server, client, _ = hosts
    key_path, key = knock_key

    def send() -> None:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                client,
                *knock_cmd,
                "open",
                SERVER_V4,
                "22/tcp",
                "--user",
                "7",
                "--key-file",
                str(key_path),
            ],
            env=knock_env,
            check=True,
            capture_output=True,
            timeout=30,
        )

    result = run_capture(server, "any", tmp_path / "out.json", send)
    assert len(result["completions"]) == 1, result
    assert open_message(bytes.fromhex(result["completions"][0]["message"]), key).port == 22
