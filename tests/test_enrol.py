"""``knockd-fast user add|list|remove``: real files in a private directory, the real loader.

What ``user add`` prints is used as the user would use it: the profile goes into a client
config file, the key line into the key file it names, the client builds its knock from
them, and the daemon's capture engine and judge take that knock from a capture file. A
printed setting that does not match the server's makes the knock fail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import stat
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knock_client import cli as knock_cli
from knock_client.keys import load_key, write_key_file
from knockd_fast import cli, frames
from knockd_fast.capture_spec import LINKTYPE_ETHERNET
from knockd_fast.config import ConfigError, load_config
from knockd_fast.enrol import add_user, file_stem, remove_user
from knockd_fast.judging import replay_capture
from knockd_fast.pcapfile import CaptureWriter

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config-example.toml"
KEY_LINE = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
SERVER, CLAIMED = "192.0.2.1", "198.51.100.7"


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def example_server(directory: Path) -> Path:
    """docs/config-example.toml, made loadable here: its relative state directory and
    alice's and bob's keys in ``keys/`` beside it."""
    private_dir(directory / "keys")
    text = EXAMPLE.read_text().replace('"/var/lib/knockd-fast"', '"state"')
    text = text.replace('"/etc/knockd-fast/keys/bob.key"', '"keys/bob.key"')
    for name in ("alice", "bob"):
        write_key_file(directory / "keys" / f"{name}.key", bytes(range(64)))
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def server(tmp_path: Path) -> Path:
    return example_server(private_dir(tmp_path / "etc"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``knockd-fast ARGS`` in this process. main() sets logging up for the process (a
    handler on the capture's stderr, the level, logging's flags): put it back, or the
    tests after this one log into a closed stream."""
    daemon_log = logging.getLogger("knockd_fast")
    handlers, level = daemon_log.handlers[:], daemon_log.level
    flags = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in flags}
    try:
        code = cli.main(list(args))
    finally:
        for handler in daemon_log.handlers[:]:
            if handler not in handlers:
                daemon_log.removeHandler(handler)
        daemon_log.setLevel(level)
        for name, value in saved.items():
            setattr(logging, name, value)
    out, err = capsys.readouterr()
    return code, out, err


def entries(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# --- add ------------------------------------------------------------------------------


def test_add_appends_one_table_and_the_real_loader_reads_it_back(server: Path, capsys) -> None:
    original = server.read_bytes()
    code, out, err = run(
        capsys, "user", "add", "carol", "--allow", "22/tcp,443/tcp", "--allow", "51820/udp",
        "--source", "24", "--host", "gw.example.org", "-c", str(server),
    )  # fmt: skip
    assert code == 0, err
    text = server.read_bytes()
    assert text.startswith(original), "every byte of the file before the new table is kept"
    added = text[len(original) :].decode()
    assert re.fullmatch(
        r"\n\[\[users\]\]\n# added by `knockd-fast user add` on \d{4}-\d\d-\d\d\n"
        r'id = 0\nname = "carol"\nkey_file = "keys/carol\.key"\n'
        r'allow = \["22/tcp", "443/tcp", "51820/udp"\]\nsource = 24\n',
        added,
    ), added
    config = load_config(server)
    carol = config.users[0]
    assert (carol.name, carol.source_prefix) == ("carol", {4: 24, 6: 24})
    assert carol.allow == {(22, "tcp"), (443, "tcp"), (51820, "udp")}
    assert carol.key_file == server.parent / "keys" / "carol.key"
    assert stat.S_IMODE(carol.key_file.stat().st_mode) == 0o600
    assert [line for line in out.splitlines() if KEY_LINE.fullmatch(line)] == [
        carol.key_file.read_text().strip()
    ], "the key line handed out is the key the server holds"
    assert config.users[7].name == "alice" and config.users[8].name == "bob"
    assert err.splitlines() == [
        f"knockd-fast: added user 'carol' (id 0) to config.toml, key in {carol.key_file} "
        "(mode 0600); hand the text above to them over a channel you trust. A running daemon "
        "takes the user on `systemctl reload knockd-fast` (SIGHUP)"
    ]
    assert entries(server.parent) == {"config.toml", "keys", "keys/alice.key", "keys/bob.key",
                                      "keys/carol.key"}  # fmt: skip


def test_add_keeps_the_files_mode_and_follows_a_symbolic_link(server: Path, tmp_path) -> None:
    server.chmod(0o640)
    link = tmp_path / "link.toml"
    link.symlink_to(server)
    add_user(link, "carol", ["22/tcp"])
    assert link.is_symlink(), "the link stays; the file it names is edited"
    assert stat.S_IMODE(server.stat().st_mode) == 0o640
    assert "carol" in [user.name for user in load_config(server).users.values()]


def test_the_first_user_goes_into_a_file_that_has_none(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "etc") / "config.toml"
    original = '# my doorman\n[capture]\ninterface = "eth0"  # the uplink\n[state]\ndirectory = "s"'
    path.write_text(original)
    config, user = add_user(path, "alice", ["22/tcp"], user_id=3)
    assert path.read_text().startswith(original + "\n\n[[users]]\n")
    assert list(load_config(path).users) == [3] and user.key == load_key(user.key_file)


def test_a_file_whose_users_are_an_inline_array_is_refused(server: Path) -> None:
    path = server.parent / "inline.toml"
    path.write_text(
        'users = [{ id = 7, name = "alice", key_file = "keys/alice.key", allow = ["22"] }]\n'
        '[capture]\ninterface = "eth0"\n[state]\ndirectory = "state"\n'
    )
    with pytest.raises(ConfigError, match=r"inline\.toml: users: an inline array"):
        add_user(path, "carol", ["22/tcp"])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ("alice --allow 22/tcp", "users[2].name: name 'alice' is already used by user id 7"),
        ("carol --allow 22/tcp --id 8", "users[2].id: id 8 is already used by user 'bob'"),
        ("carol --allow 22 --id 4096", "users[2].id: 4096 is outside 0..4095"),
        ("carol --allow 22/sctp",
         "users[2].allow[0]: bad port spec '22/sctp': protocol must be tcp or udp"),
        ("carol --allow 22,70000",
         "users[2].allow[1]: bad port spec '70000': port must be a number in 1..65535"),
        ("carol --allow 22 --source 129", "users[2].source: prefix length 129 is outside 0..128"),
        ("carol --allow 22 --source near", 'users[2].source: expected "exact", "any", a prefix '),
        (["car\tol", "--allow", "22"], "users[2].name: 'car\\tol' has unprintable characters"),
        (["", "--allow", "22"], "users[2].name: must not be empty"),
        ("carol --allow 22 --key-file keys/bob.key",
         "users[2].key_file: key file {keys}/bob.key already exists; remove it first, or give "
         "another --key-file (an existing key is never reused or overwritten)"),
    ],
)  # fmt: skip
def test_a_refused_add_is_one_line_exit_2_and_writes_nothing(
    server: Path, capsys, args: str | list[str], error: str
) -> None:
    original, before = server.read_bytes(), entries(server.parent)
    argv = args.split() if isinstance(args, str) else args
    code, out, err = run(capsys, "user", "add", *argv, "-c", str(server))
    assert code == cli.EXIT_CONFIG
    assert out == ""
    assert len(err.splitlines()) == 1
    expected = f"knockd-fast: error: {server}: {error.format(keys=server.parent / 'keys')}"
    assert err.startswith(expected), err
    assert server.read_bytes() == original
    assert entries(server.parent) == before, "no key, no temporary file left behind"


def test_a_key_that_the_reload_would_refuse_leaves_nothing_behind(server: Path, capsys) -> None:
    """The second load, with the keys, as a reload reads the file: bob's key is made
    unreadable for the daemon, so the file with carol in it would not be taken."""
    (server.parent / "keys" / "bob.key").chmod(0o644)
    original, before = server.read_bytes(), entries(server.parent)
    code, _, err = run(capsys, "user", "add", "carol", "--allow", "22", "-c", str(server))
    assert code == cli.EXIT_CONFIG
    assert f"{server}: users[1].key_file: key file " in err and "(mode 0644)" in err
    assert server.read_bytes() == original and entries(server.parent) == before


ALLOWED = st.builds("{}/{}".format, st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))


def enrol_or_refuse(name: str, allow: str) -> None:
    """``add_user`` in a fresh copy of the example: either the loader reads back exactly
    what was asked, or a one-line error names the file and a users key, and the directory
    is as it was."""
    with tempfile.TemporaryDirectory() as directory:
        path = example_server(Path(directory))
        original, before = path.read_bytes(), entries(path.parent)
        try:
            _, user = add_user(path, name, [allow])
        except ConfigError as error:
            assert "\n" not in str(error) and str(error).startswith(f"{path}: users")
            assert path.read_bytes() == original and entries(path.parent) == before
            return
        loaded = load_config(path).users[user.id]
        port, proto = knock_cli.parse_port_spec(allow)
        assert (loaded.name, loaded.allow, loaded.key) == (name, {(port, str(proto))}, user.key)
        assert loaded.key_file.parent == path.parent / "keys", "the key stays in keys/"
        assert path.read_bytes().startswith(original)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(max_size=70), allow=ALLOWED)
def test_any_name_is_enrolled_exactly_or_refused_cleanly(name: str, allow: str) -> None:
    enrol_or_refuse(name, allow)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allow=st.one_of(st.text(max_size=12), ALLOWED))
def test_any_port_spec_is_enrolled_exactly_or_refused_cleanly(allow: str) -> None:
    enrol_or_refuse("carol", allow)


@pytest.mark.parametrize(
    ("name", "stem"),
    [("alice", "alice"), ("a.b-c_d", "a.b-c_d"), ("../x", "_._x"), (".hidden", "_hidden"),
     ("zoë o'brien", "zo__o_brien"), ("a/b", "a_b")],
)  # fmt: skip
def test_key_file_names_stay_plain_files_in_the_keys_folder(name: str, stem: str) -> None:
    assert file_stem(name) == stem


# --- the handout works against the server ---------------------------------------------


def knock_config(directory: Path, layout: str, modes: str) -> Path:
    private_dir(directory)
    path = directory / "config.toml"
    path.write_text(
        f"[knock]\n{layout}\nmodes = {modes}\n"
        f'[capture]\ninterface = "eth0"\ndestinations = ["{SERVER}"]\n'
        '[state]\ndirectory = "state"\n'
    )
    return path


def use_handout(printed: str, home: Path) -> tuple[str, Path]:
    """Do what the handout says: its key line into the key file its profile names, its
    profile into the client's config file. Returns the profile's name and that file."""
    profile = "\n".join(
        re.search(r"^\[profiles\..*?(?=^#)", printed, re.S | re.M).group(0).splitlines()
    )
    (key_line,) = [line for line in printed.splitlines() if KEY_LINE.fullmatch(line)]
    name, table = next(iter(tomllib.loads(profile)["profiles"].items()))
    key_file = Path(table["key_file"].replace("~", str(home), 1))
    private_dir(key_file.parent)
    key_file.write_text(key_line + "\n")
    key_file.chmod(0o600)
    client_config = home / ".config" / "knock" / "config.toml"
    client_config.write_text(profile + "\n")
    return name, client_config


@pytest.mark.parametrize(
    ("layout", "modes", "sent_as"),
    [
        ("base_port = 30000\ndigit_bits = 6\nspa_port = 61000", '["syn", "udp", "spa"]', "syn"),
        ("base_port = 21000\ndigit_bits = 10\nspa_port = 62000", '["udp"]', "udp"),
        ("", '["spa"]', "spa"),
    ],
)
def test_the_printed_profile_and_key_knock_open_the_servers_port(
    tmp_path: Path, capsys, monkeypatch, layout: str, modes: str, sent_as: str
) -> None:
    path = knock_config(tmp_path / "etc", layout, modes)
    code, printed, err = run(
        capsys, "user", "add", "carol", "--allow", "2222/tcp", "--host", SERVER, "-c", str(path)
    )
    assert code == 0, err
    home = private_dir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    profile, _ = use_handout(printed, home)
    assert printed.rstrip().endswith(f"knock open {profile} 2222/tcp")

    argv = ["open", profile, "2222/tcp", "--dry-run", "--json", "--claimed-ip", CLAIMED]
    assert knock_cli.main(argv) == 0
    knock = json.loads(capsys.readouterr().out)
    capture = tmp_path / "knock.pcap"
    now = int(time.time())
    with CaptureWriter(capture, LINKTYPE_ETHERNET) as writer:
        for n, port in enumerate(knock["ports"]):  # in the client's (shuffled) order
            if knock["mode"] == "syn":
                packet = frames.ipv4(CLAIMED, SERVER, 6, frames.tcp(40000, port, "S"))
            elif knock["mode"] == "udp":
                packet = frames.ipv4(CLAIMED, SERVER, 17, frames.udp(40000, port))
            else:
                payload = bytes.fromhex(knock["message"])
                packet = frames.ipv4(CLAIMED, SERVER, 17, frames.udp(40000, port, payload))
            writer.write(now, n, frames.ethernet(packet))

    class Recorder:
        def __init__(self) -> None:
            self.decisions: list = []

        def write(self, decisions) -> None:  # noqa: ANN001
            self.decisions.extend(decisions)

        def close(self) -> None:
            pass

    recorder = Recorder()
    replay_capture(load_config(path), str(capture), [recorder])
    assert [(d.user, d.action, d.port, d.verdict, d.reason) for d in recorder.decisions] == [
        ("carol", "open", 2222, "accepted", "ok")
    ]
    assert knock["mode"] == sent_as, "the first mode the server takes, syn before udp before spa"


def test_without_host_the_profile_has_a_placeholder_and_a_name_of_this_machine(
    server: Path, capsys
) -> None:
    code, printed, _ = run(capsys, "user", "add", "carol", "--allow", "22", "-c", str(server))
    assert code == 0
    assert 'host = "SERVER-NAME-OR-ADDRESS"  # put this server\'s name or address here' in printed
    code, printed, _ = run(
        capsys, "user", "add", "dave", "--allow", "22", "--profile", "my gw", "-c", str(server)
    )
    assert code == 0
    assert '[profiles."my gw"]' in printed and "knock open my gw 22/tcp" in printed
    assert 'key_file = "~/.config/knock/my_gw.key"' in printed


# --- remove ---------------------------------------------------------------------------


def test_remove_cuts_exactly_that_users_table_and_deletes_its_key(server: Path, capsys) -> None:
    original = server.read_text()
    start = original.index("[[users]]\n# 0..4095")  # alice's table ...
    end = original.index("[[users]]\nid = 8")  # ... ends where bob's begins
    code, out, err = run(capsys, "user", "remove", "alice", "-c", str(server))
    assert code == 0, err
    assert server.read_text() == original[:start] + original[end:]
    assert [user.name for user in load_config(server).users.values()] == ["bob"]
    key = server.parent / "keys" / "alice.key"
    assert not key.exists()
    assert err.splitlines() == [
        f"knockd-fast: removed user 'alice' (id 7); deleted key file {key}. A running daemon "
        "closes their grants on `systemctl reload knockd-fast` (SIGHUP)"
    ]


def test_remove_keeps_the_key_when_asked_or_when_another_user_uses_it(server: Path) -> None:
    bob_key = server.parent / "keys" / "bob.key"
    server.write_text(server.read_text().replace('"keys/alice.key"', '"keys/bob.key"'))
    removal = remove_user(server, "alice")
    assert removal.key_file_note == f"kept key file {bob_key}: user 'bob' uses it too"
    add_user(server, "carol", ["22"])
    removal = remove_user(server, "bob", keep_key=True)
    assert removal.key_file_note == f"kept key file {bob_key} (--keep-key)"
    assert bob_key.exists()
    assert [user.name for user in load_config(server).users.values()] == ["carol"]


def test_remove_from_a_file_whose_users_are_interleaved_with_other_tables(tmp_path) -> None:
    directory = private_dir(tmp_path / "etc")
    for name in ("a", "b", "c"):
        write_key_file(private_dir(directory / "keys") / f"{name}.key", bytes(64))
    users = [
        f'[[users]]  # {n}\nid = {i}\nname = "{n}"\nkey_file = "keys/{n}.key"\nallow = ["22"]\n'
        for i, n in enumerate("abc")
    ]
    tail = "[users.source]\nipv4 = 24\n\n"
    text = (
        f"{users[0]}\n[capture]\ninterface = \"eth0\"\n\n{users[1]}{tail}# state next\n"
        f"[state]\ndirectory = \"state\"\n\n{users[2]}"
    )
    path = directory / "config.toml"
    path.write_text(text)
    remove_user(path, "a")
    assert path.read_text() == text.replace(users[0] + "\n", "", 1)
    remove_user(path, "b")
    assert path.read_text() == text.replace(users[0] + "\n", "", 1).replace(
        users[1] + tail, "", 1
    ), "its sub-table goes with it; the comment about [state] stays"
    assert [user.name for user in load_config(path).users.values()] == ["c"]


def test_removing_the_last_user_or_an_unknown_one_is_refused(server: Path, capsys) -> None:
    assert remove_user(server, "alice")
    original = server.read_bytes()
    code, _, err = run(capsys, "user", "remove", "bob", "-c", str(server))
    assert (code, err) == (
        2, f"knockd-fast: error: {server}: users: no [[users]] entries; the daemon would "
        "accept nobody\n",
    )  # fmt: skip
    code, _, err = run(capsys, "user", "remove", "zed", "-c", str(server))
    assert (code, err) == (2, f"knockd-fast: error: {server}: users: no user named 'zed' "
                              "(users: 'bob')\n")  # fmt: skip
    assert server.read_bytes() == original
    assert (server.parent / "keys" / "bob.key").exists()


# --- list -----------------------------------------------------------------------------


def test_list_names_each_user_and_whether_its_key_would_load(server: Path, capsys) -> None:
    add_user(server, "carol", ["51820/udp", "22"], source="any")
    (server.parent / "keys" / "bob.key").chmod(0o640)
    (server.parent / "keys" / "carol.key").unlink()
    code, out, _ = run(capsys, "user", "list", "-c", str(server))
    assert code == 0
    keys = server.parent / "keys"
    assert [line.split("  ")[0] for line in out.splitlines()] == ["NAME", "alice", "bob", "carol"]
    assert [re.split(r"\s{2,}", line) for line in out.splitlines()[1:]] == [
        ["alice", "7", "22/tcp,443/tcp,51820/udp", "exact", f"{keys}/alice.key", "ok (mode 0600)"],
        ["bob", "8", "22/tcp", "{ ipv4 = 24, ipv6 = 56 }", f"{keys}/bob.key",
         "readable or writable by group or others (mode 0640); run: chmod 600 "
         f"{keys}/bob.key"],
        ["carol", "0", "22/tcp,51820/udp", "any", f"{keys}/carol.key", "not found"],
    ]  # fmt: skip
    code, out, _ = run(capsys, "user", "list", "--json", "-c", str(server))
    assert json.loads(out)[2] == {
        "name": "carol", "id": 0, "allow": ["22/tcp", "51820/udp"], "source": "any",
        "key_file": f"{keys}/carol.key", "key_state": "not found",
    }  # fmt: skip


# --- a running daemon -----------------------------------------------------------------


@contextlib.contextmanager
def _harness(directory: Path, **options):
    from e2e import doorman
    from netns import NetnsUnavailable

    try:
        with doorman(directory, **options) as harness:
            yield harness
    except NetnsUnavailable as error:
        pytest.skip(f"network namespaces unavailable: {error}")


@pytest.mark.netns
@pytest.mark.extension
def test_enrolled_user_knocks_on_a_running_daemon_and_remove_closes_the_grant(
    tmp_path: Path,
) -> None:
    """The whole round: ``user add`` on a running daemon's config, SIGHUP, the printed
    profile and key knock from the client namespace and open the port; ``user remove``,
    SIGHUP, and the daemon closes that user's grant in the kernel."""
    from e2e import SERVER_V4, knock_command, ns_run

    port = 2222
    with _harness(tmp_path / "e2e", ports=(port,)) as h:
        added = h.knockd("user", "add", "carol", "--allow", f"{port}/tcp", "--host", SERVER_V4,
                         "-c", str(h.config_path))  # fmt: skip
        assert added.returncode == 0, added.stderr
        h.send_signal(signal.SIGHUP)
        h.wait_log(r"^reloaded .*: 2 users")
        home = h.directory / "home"
        profile, _ = use_handout(added.stdout, home)
        env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
        assert not h.can_connect(SERVER_V4, port)
        h.cursor = h.mark()
        done = ns_run(h.client, [*knock_command(), "open", profile, f"{port}/tcp"], env=env)
        assert done.returncode == 0, done.stderr
        decision = h.wait_decision(lambda d: d["user"] == "carol")
        assert (decision["verdict"], decision["reason"]) == ("accepted", "ok"), decision
        h.wait_log(rf"^firewall: opened {port}/tcp for ")
        assert h.can_connect(SERVER_V4, port)

        removed = h.knockd("user", "remove", "carol", "-c", str(h.config_path))
        assert removed.returncode == 0, removed.stderr
        h.send_signal(signal.SIGHUP)
        h.wait_log(rf"^reload: closing {port}/tcp for \S+ to \S+ \(user carol\) \(user removed\)")
        h.wait_log(rf"^firewall: closed {port}/tcp ")
        h.wait_log(r"^reloaded .*: 1 users")
        assert not h.can_connect(SERVER_V4, port), "the removed user's grant is closed"
        assert h.grant_rules() == []
        h.stop()
