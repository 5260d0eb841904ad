"""The `tulle` command as tests run it: every subcommand found by walking the parser that
build_parser() makes (so a new command is covered as soon as it is registered), plausible
arguments for each, and a run of the real entry point (.venv/bin/tulle) as a subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tulle.cli.main import build_parser

TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")

Path = tuple[str, ...]  # a subcommand's words: ("lab", "pod", "add")


def subparsers_of(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:  # type: ignore[type-arg]
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def walk(
    parser: argparse.ArgumentParser | None = None, path: Path = ()
) -> Iterator[tuple[Path, argparse.ArgumentParser]]:
    """Every parser of the tree, the root first, with the words that reach it."""
    parser = parser or build_parser()
    yield path, parser
    for action in subparsers_of(parser):
        for name, child in action.choices.items():
            yield from walk(child, (*path, name))


def leaves() -> list[tuple[Path, argparse.ArgumentParser]]:
    """The subcommands that run something (no subcommands of their own)."""
    return [(path, parser) for path, parser in walk() if path and not subparsers_of(parser)]


def takes_lab_option(parser: argparse.ArgumentParser) -> bool:
    return any("--lab" in a.option_strings for a in parser._actions)


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


# Plausible values of positional arguments and required options, by their dest: what a user
# would type. A new command whose argument is not here fails the tests that walk the tree until
# it is added.
PLAUSIBLE: dict[str, list[str]] = {
    "name": ["LAB"],  # the lab's name: replaced by the test's lab
    "node": ["node1"],
    "pod": ["x/a"],
    "kind": ["pod"],
    "names": ["a"],
    "args": ["a", "k=v"],  # label NAME KEY=VALUE
    "src": ["10.244.0.5"],
    "dst": ["10.244.0.6"],
    "port": ["80/tcp"],
    "address": ["10.244.0.5"],
    "cmd": ["--", "true"],
    # options a command requires
    "datastore": ["http://127.0.0.1:9"],  # agent: the discard port, where nothing listens
    "filename": ["objects.yaml"],  # apply -f
}


@dataclass(frozen=True)
class Command:
    path: Path
    parser: argparse.ArgumentParser

    @property
    def words(self) -> str:
        return " ".join(self.path)

    def argv(self, lab: str, bad_flag: str | None = None, values: Mapping[str, list[str]] | None = None) -> list[str]:
        """The command with plausible positionals, the lab's name where it takes one (positional
        or --lab) and, if given, a flag no command has, right after the command's words (before a
        `-- CMD` that would take it as its own)."""
        argv = list(self.path)
        if bad_flag:
            argv.append(bad_flag)
        for action in positionals(self.parser):
            argv += self._value(action, values)
        for action in self.parser._actions:
            if action.option_strings and action.required and action.dest != "lab":
                argv += [action.option_strings[-1], *self._value(action, values)]
        if takes_lab_option(self.parser):
            argv[len(self.path) : len(self.path)] = ["--lab", lab]
        return [lab if value == "LAB" else value for value in argv]

    def _value(self, action: argparse.Action, values: Mapping[str, list[str]] | None) -> list[str]:
        given = (values or {}).get(action.dest) or PLAUSIBLE.get(action.dest)
        if given is None:
            raise AssertionError(f"`tulle {self.words}` takes {action.dest!r}, which tests/clilib.py PLAUSIBLE lacks")
        return given


def commands() -> list[Command]:
    return [Command(path, parser) for path, parser in leaves()]


@dataclass(frozen=True)
class Ran:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"tulle {' '.join(self.argv)} -> {self.returncode} in {self.seconds:.1f} s; stderr: {self.stderr!r}"


def run(argv: list[str], timeout: float = 60.0, env: Mapping[str, str] | None = None) -> Ran:
    started = time.monotonic()
    proc = subprocess.run(
        [TULLE, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
    )
    return Ran(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def one_error_line(ran: Ran) -> str:
    """The failed command's one line on stderr, `error: ...`; an AssertionError otherwise."""
    assert "Traceback" not in ran.stderr, str(ran)
    assert ran.returncode != 0, str(ran)
    lines = ran.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), str(ran)
    return lines[0]
