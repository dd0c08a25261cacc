"""The man pages in man/ stay in step with the code they describe.

- knock(1) and knockd-fast(8): every subcommand has its own section, listing every option
  (and positional argument) its argparse parser has, and no option it lacks; the
  program's own options are under OPTIONS; every exit code the CLI module names is under
  EXIT STATUS; knock(1) lists every profile key the client reads.
- knockd-fast.toml(5): the tables and keys it documents are exactly those the loader
  accepts (probed through ``load_config`` itself, so a key added to or removed from the
  code fails here); every one of docs/config-example.toml's is among them, with the
  example's value as its default; each key says whether SIGHUP applies it, as
  ``config.RESTART_ONLY`` has it.
- groff renders every page without a warning.

The pages follow a few roff conventions for this (each page's header comment says which):
a ``.TP`` entry's tag line names the option or key, ``.SS`` titles name subcommands or
tables.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

import knockd_fast.cli as daemon_cli
from knock_client import cli as client_cli
from knockd_fast.config import RESTART_ONLY, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = sorted(MAN.glob("*.[0-9]"))
CLIENT_PAGE = MAN / "knock.1"
DAEMON_PAGE = MAN / "knockd-fast.8"
CONFIG_PAGE = MAN / "knockd-fast.toml.5"
EXAMPLE_CONFIG = ROOT / "docs" / "config-example.toml"


# --- reading roff -----------------------------------------------------------------------

_ESCAPES = {
    r"\-": "-",
    r"\(dq": '"',
    r"\(aq": "'",
    r"\(ti": "~",
    r"\(en": "-",
    r"\(em": "-",
    r"\e": "\\",
    r"\&": "",
    r"\|": "",
}
_FONT = re.compile(r"\\f(?:[BIRP]|\(..|\[[^]]*\])")
_ESCAPE = re.compile("|".join(map(re.escape, _ESCAPES)))
_MACRO_ARG = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
# Font macros: their arguments are the text, joined without spaces for the alternating ones.
_FONT_MACROS = {"B": " ", "I": " ", "SM": " ", "BR": "", "BI": "", "IB": "", "IR": "", "RB": "",
                "RI": ""}  # fmt: skip
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)")


def plain(roff: str) -> str:
    """A line of roff as the reader sees it: fonts dropped, escapes resolved."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group()], _FONT.sub("", roff))


def _line_text(line: str) -> str:
    """The text a line contributes: a text line itself, a font macro its arguments."""
    if not line.startswith((".", "'")):
        return plain(line)
    name, _, rest = line[1:].partition(" ")
    joiner = _FONT_MACROS.get(name)
    if joiner is None:
        return ""
    args = [quoted.replace('""', '"') if quoted else bare for quoted, bare in
            _MACRO_ARG.findall(rest)]  # fmt: skip
    return plain(joiner.join(args))


@dataclass
class Entry:
    """One ``.TP`` paragraph: its tag line and the text under it."""

    tag: str
    body: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.body).split())

    @property
    def name(self) -> str:
        """The first word of the tag: a key, an option, an exit code."""
        return self.tag.split()[0] if self.tag.split() else ""

    @property
    def options(self) -> set[str]:
        return set(_OPTION.findall(self.tag))


@dataclass
class Section:
    """A ``.SH`` heading, or one ``.SS`` under it (``title``), with its ``.TP`` entries."""

    heading: str
    title: str = ""
    entries: list[Entry] = field(default_factory=list)


def read_page(path: Path) -> list[Section]:
    """The page's sections in order, each with the ``.TP`` entries written in it."""
    sections: list[Section] = []
    entry: Entry | None = None
    tag_next = False
    depth = 0  # inside .RS/.RE a .TP is part of the entry that holds it, not an entry
    for line in path.read_text().splitlines():
        if line.startswith((r".\"", r"'\"")):
            continue
        macro = line[1:].split(" ", 1)[0] if line.startswith(".") else ""
        if macro in ("SH", "SS"):
            title = _line_text(".B " + line[4:])
            heading = title if macro == "SH" else sections[-1].heading
            sections.append(Section(heading, title if macro == "SS" else ""))
            entry, tag_next = None, False
        elif macro == "RS":
            depth += 1
        elif macro == "RE":
            depth -= 1
        elif macro == "TP" and depth == 0:
            tag_next = True
        elif macro in ("PP", "P", "LP") and depth == 0:
            entry = None
        elif tag_next:
            entry = Entry(_line_text(line))
            sections[-1].entries.append(entry)
            tag_next = False
        elif entry is not None:
            entry.body.append(_line_text(line))
    return sections


def section(page: list[Section], heading: str, title: str = "") -> Section:
    found = [s for s in page if s.heading == heading and s.title == title]
    assert len(found) == 1, f"expected one section {heading}/{title or '-'}, found {len(found)}"
    return found[0]


# --- the command lines ------------------------------------------------------------------


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under ``parser`` with the subcommand names leading to it, nested
    subcommands (``user add``) included; the root itself comes first, as ``()``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string but help's, which argparse adds to each parser."""
    return {
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }


def help_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        if isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [
        action.metavar or action.dest
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
    ]


CLIS = [
    pytest.param(CLIENT_PAGE, client_cli.make_parser, client_cli, id="knock"),
    pytest.param(DAEMON_PAGE, daemon_cli.build_parser, daemon_cli, id="knockd-fast"),
]


def command_sections(page: list[Section]) -> dict[tuple[str, ...], Section]:
    """The sections under COMMANDS by the subcommand each documents: a title names one
    (``run``, ``user add``) or several sharing their options (``open, close``)."""
    by_command: dict[tuple[str, ...], Section] = {}
    for item in page:
        if item.heading == "COMMANDS" and item.title:
            for name in item.title.split(","):
                by_command[tuple(name.split())] = item
    return by_command


@pytest.mark.parametrize(("page_path", "build", "module"), CLIS)
def test_every_subcommand_has_a_section_with_exactly_its_options(page_path, build, module):
    page = read_page(page_path)
    documented = command_sections(page)
    expected = {path: p for path, p in commands(build()) if path and not has_subcommands(p)}
    assert expected, "no subcommands found: is this still the parser the CLI uses?"
    assert sorted(documented) == sorted(expected), "sections under COMMANDS vs subcommands"
    for path, parser in expected.items():
        entries = documented[path].entries
        shown = set().union(*(entry.options for entry in entries))
        name = " ".join(path)
        assert option_strings(parser) <= shown, f"{name}: options missing from the page"
        assert shown <= option_strings(parser) | help_strings(parser), (
            f"{name}: the page has options the command lacks"
        )
        tags = {entry.name for entry in entries}
        assert set(positionals(parser)) <= tags, f"{name}: arguments missing from the page"


@pytest.mark.parametrize(("page_path", "build", "module"), CLIS)
def test_the_programs_own_options(page_path, build, module):
    parser = build()
    shown = set().union(*(e.options for e in section(read_page(page_path), "OPTIONS").entries))
    assert option_strings(parser) | help_strings(parser) == shown


@pytest.mark.parametrize(("page_path", "build", "module"), CLIS)
def test_every_exit_code_the_cli_names(page_path, build, module: ModuleType):
    codes = {str(v) for k, v in vars(module).items() if k.startswith("EXIT_")}
    assert codes, f"{module.__name__} names no EXIT_ constants any more"
    shown = {entry.name for entry in section(read_page(page_path), "EXIT STATUS").entries}
    assert codes <= shown


def test_every_profile_key_of_the_client():
    shown = {entry.name for entry in section(read_page(CLIENT_PAGE), "PROFILES").entries}
    assert shown == set(client_cli._PROFILE_KEYS)


# --- the configuration file -------------------------------------------------------------

_PROBE = "probe_not_a_key"
_UNKNOWN = re.compile(r"unknown (?:key|table) \(known: (.*)\)")


def _probe_config(state_dir: Path, where: tuple[str, ...] | None) -> str:
    """A valid config but for ``_PROBE`` at ``where``: at the top (``()``), in a table
    (``("knock",)``), or as a key of a table given in place of a key's value
    (``("users", "source")``: ``source = { PROBE = 1 }``); ``None``: nowhere."""
    tables = {
        "knock": [],
        "capture": ['interface = "lo"'],
        "grants": [],
        "limits": [],
        "state": [f"directory = {json.dumps(str(state_dir))}"],
        "metrics": [],
        "fleet": [],
        "[users]": ["id = 1", 'name = "probe"', 'key_file = "probe.key"', 'allow = ["22/tcp"]'],
    }
    lines = [f"{_PROBE} = 1"] if where == () else []
    for header, keys in tables.items():
        table = header.strip("[]")
        if where and where[0] == table:
            if len(where) == 1:
                keys = [*keys, f"{_PROBE} = 1"]
            else:
                value = f"{{ {_PROBE} = 1 }}"
                for key in reversed(where[2:]):
                    value = f"{{ {key} = {value} }}"
                keys = [k for k in keys if not k.startswith(f"{where[1]} ")]
                keys.append(f"{where[1]} = {value}")
        lines += [f"[{header}]", *keys]
    return "\n".join(lines) + "\n"


def _known(folder: Path, where: tuple[str, ...]) -> set[str] | None:
    """The names ``load_config`` knows at ``where`` (from its unknown-key error), or None
    when ``where`` is no table: the probe there is refused as a wrong value, or ignored."""
    path = folder / "config.toml"
    path.write_text(_probe_config(folder / "state", where))
    try:
        load_config(path, load_keys=False)
    except ConfigError as error:
        match = _UNKNOWN.fullmatch(error.reason)
        key = re.sub(r"\[\d+\]", "", error.key or "")  # users[0].id -> users.id
        if key == ".".join((*where, _PROBE)) and match:
            return set(match.group(1).split(", "))
    return None


@pytest.fixture(scope="module")
def config_schema(tmp_path_factory) -> set[str]:
    """Every table and dotted key the loader accepts (``users.source.ipv4`` for a key of an
    inline table), found by asking ``load_config`` itself."""
    folder = tmp_path_factory.mktemp("schema")
    path = folder / "config.toml"
    path.write_text(_probe_config(folder / "state", None))
    load_config(path, load_keys=False)  # the probes' base is valid: their errors are theirs
    names: set[str] = set()
    pending: list[tuple[str, ...]] = [()]
    while pending:
        where = pending.pop()
        known = _known(folder, where)
        if known is None:
            continue
        for name in known:
            names.add(".".join((*where, name)))
            pending.append((*where, name))
    return names


def _example_names(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every table and dotted key of a parsed TOML document, ``[[users]]`` entries as one."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict):
            for key, child in item.items():
                name = f"{prefix}.{key}" if prefix else key
                yield name, child
                if isinstance(child, dict) or (
                    isinstance(child, list) and child and isinstance(child[0], dict)
                ):
                    yield from _example_names(child, name)


def config_entries() -> dict[str, Entry]:
    """The keys knockd-fast.toml(5) documents, by dotted name, from the SETTINGS section:
    one ``.SS [table]`` or ``.SS [[table]]`` per table, one ``.TP`` per key."""
    page = read_page(CONFIG_PAGE)
    entries: dict[str, Entry] = {}
    for item in page:
        if item.heading != "SETTINGS" or not item.title:
            continue
        assert re.fullmatch(r"\[\[?[a-z_]+\]?\]", item.title), f"not a table: {item.title}"
        table = item.title.strip("[]")
        for entry in item.entries:
            name = f"{table}.{entry.name}"
            assert name not in entries, f"{name} is documented twice"
            entries[name] = entry
    return entries


def documented_tables() -> set[str]:
    return {
        s.title.strip("[]") for s in read_page(CONFIG_PAGE) if s.heading == "SETTINGS" and s.title
    }


def test_the_config_page_documents_exactly_what_the_loader_accepts(config_schema):
    documented = documented_tables() | set(config_entries())
    assert not documented - config_schema, "documented, but the loader refuses them"
    assert not config_schema - documented, "accepted by the loader, but not documented"


def test_every_table_and_key_of_the_example_is_documented():
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    names = {name for name, _ in _example_names(example)}
    assert names - set(example) <= set(config_entries())
    assert set(example) <= documented_tables()


def test_the_documented_defaults_are_the_examples():
    # The example shows every key with its default, but for the required capture.interface
    # and the [[users]] entries.
    example = tomllib.loads(EXAMPLE_CONFIG.read_text())
    entries = config_entries()
    checked = 0
    for name, value in _example_names(example):
        if name in entries and not name.startswith("users.") and name != "capture.interface":
            assert f"Default: {json.dumps(value)}." in entries[name].text, name
            checked += 1
    assert checked >= 15


def test_each_key_says_whether_sighup_applies_it():
    restart_only = {key for key, _ in RESTART_ONLY}
    entries = config_entries()
    assert restart_only <= set(entries)
    for name, entry in entries.items():
        says_restart = "On SIGHUP: needs a restart." in entry.text
        says_applied = "On SIGHUP: applied at once." in entry.text
        assert says_restart != says_applied, f"{name}: say one of the two"
        assert says_restart == (name in restart_only), name


# --- rendering ----------------------------------------------------------------------------


def test_the_three_pages_are_there():
    # Also keeps the rendering test below from passing on an empty list.
    assert {CLIENT_PAGE, DAEMON_PAGE, CONFIG_PAGE} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_renders_without_warnings(page: Path):
    groff = shutil.which("groff")
    assert groff, "groff is missing: `make deps` installs groff-base"
    result = subprocess.run(
        [groff, "-man", "-ww", "-z", str(page)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
