"""What every `tulle` command does the same way, whatever it does:

- a failure the user can act on (no such lab, etcd unreachable, a refused object, a bad flag)
  is one line on stderr, `error: ...`, and a non-zero exit status; a traceback means a bug;
- output cut short by its reader (`tulle status | head -1`) ends quietly, as a Unix tool's does;
- `--help` lists every subcommand with a line on what it does, and every option with what it
  does and its default.

A command whose exit statuses mean something to scripts (0 allowed, 1 denied) may give its
errors another status: `parser.set_defaults(error_status=2)`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tulle.cli.common import UserError

USAGE_STATUS = 2  # argparse's, and the shell's, status for a command used wrongly
# What a shell reports for a C tool killed by SIGPIPE (`yes | head -1` under pipefail): not 1,
# which `policy trace` uses for "denied".
PIPE_CLOSED_STATUS = 128 + signal.SIGPIPE
INTERRUPTED_STATUS = 128 + signal.SIGINT


def shows_default(action: argparse.Action) -> bool:
    """Whether an option's help should say its default: a value the user would otherwise have to
    guess (not None, False, an empty list, or a hidden one).

    >>> parser = argparse.ArgumentParser()
    >>> [shows_default(parser.add_argument(flag, **kw)) for flag, kw in [
    ...     ("--mode", {"default": "vxlan"}), ("--json", {"action": "store_true"}),
    ...     ("--label", {"action": "append", "default": []}), ("--interface", {})]]
    [True, False, False, False]
    """
    default = action.default
    if not action.option_strings or default is argparse.SUPPRESS or default is None or default is False:
        return False
    if isinstance(action, argparse._HelpAction | argparse._VersionAction):
        return False
    return not (isinstance(default, list | tuple | dict | set) and not default)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter without its noise: `(default: %(default)s)` only
    where `shows_default` says so and the help does not already speak of its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class CliParser(argparse.ArgumentParser):
    """The parser of `tulle` and, through add_subparsers, of every subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: None = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the subcommand that was given them, so that its --help is named
            chosen_parser(self, parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        # One line like every other error; the usage is one --help away.
        self.exit(USAGE_STATUS, f"error: {message} (see `{self.prog} --help`)\n")


def chosen_parser(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that `parsed` came through (`tulle lab pod add`'s)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(parsed, action.dest, None) if action.dest != argparse.SUPPRESS else None
            if name in action.choices:
                return chosen_parser(action.choices[name], parsed)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a command may meet that is no bug of Tulle's: the user's to fix or to know about.
    Imported when an error happens, so that a command starts without the lab's modules."""
    from tulle.dataplane.netns import NetnsGone
    from tulle.datastore.base import Conflict, DatastoreError
    from tulle.ipam.allocator import IpamError
    from tulle.lab.cluster import LabError
    from tulle.lab.pki import PkiError
    from tulle.lab.podman import PodmanError
    from tulle.lab.runtime import CniFailure
    from tulle.lab.state import LabNotFound
    from tulle.lab.topology import TopologyError
    from tulle.model.kinds import UnknownKind
    from tulle.model.pools import PoolError
    from tulle.model.selectors import SelectorError
    from tulle.model.validation import AdmissionError

    return (
        UserError,
        DatastoreError,  # unreachable, refused, bad credentials: the message names the URL
        Conflict,
        LabNotFound,
        LabError,
        TopologyError,
        CniFailure,
        PodmanError,
        PkiError,
        NetnsGone,
        AdmissionError,
        UnknownKind,
        SelectorError,
        PoolError,
        IpamError,
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        OSError,  # a file, a permission, a socket of this machine; BrokenPipeError is handled first
    )


def one_line(exc: BaseException) -> str:
    """The error as one line: its message's lines joined; a failed program with what it said.

    >>> one_line(ValueError("lab x exists\\n(see `tulle lab down x`)"))
    'lab x exists (see `tulle lab down x`)'
    >>> one_line(subprocess.CalledProcessError(1, ["ip", "netns", "add", "x"], stderr="RTNETLINK: File exists\\n"))
    '`ip netns add x` failed (exit status 1): RTNETLINK: File exists'
    """
    if isinstance(exc, subprocess.CalledProcessError):
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        cmd = " ".join(map(str, exc.cmd)) if isinstance(exc.cmd, list | tuple) else str(exc.cmd)
        text = f"`{cmd}` failed (exit status {exc.returncode})" + (f": {said.strip()}" if said.strip() else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr)
    except BrokenPipeError:  # nobody reads stderr either
        pass


def _stop_writing_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it again at exit, and a second BrokenPipeError
    there would be printed as 'Exception ignored ...' (the recipe of Python's signal docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse argv, run the command it names, and turn its outcome into an exit status."""
    args: argparse.Namespace | None = None
    try:
        try:
            args = parser.parse_args(argv)
            command: Callable[[argparse.Namespace], int | None] = args.func
            return command(args) or 0
        finally:
            sys.stdout.flush()  # a closed pipe shows here, where it can still be handled
    except SystemExit:
        raise  # argparse's own ending (--help, a bad flag), already said
    except BrokenPipeError:
        _stop_writing_stdout()
        return PIPE_CLOSED_STATUS
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    except expected_errors() as exc:
        _say(f"error: {one_line(exc)}")
        return int(getattr(args, "error_status", 1))
