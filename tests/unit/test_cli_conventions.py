"""What every `tulle` command does the same way (src/tulle/cli/conventions.py), checked on every
subcommand the parser has:

- help: every subcommand is listed in its parent's help with a line on what it does; every
  argument says what it does, and an option with a default shows it;
- a bad flag is one line on stderr, `error: ...`, exit status 2, whatever the command;
- output cut short by its reader (`| head -1`) ends quietly: no traceback, no
  'Exception ignored', exit status 141 as for a Unix tool killed by SIGPIPE;
- `tulle --version` and `tulle version` give this installation's version, and the agents'
  as they publish it on their Node objects.

The missing-lab and stopped-etcd cases need a lab: tests/e2e/test_cli_errors.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.clilib import TULLE, Command, commands, run, subparsers_of, walk
from tulle.agent.informers import Informer
from tulle.agent.node import ANNOTATION_AGENT_VERSION, installed_version, node_object
from tulle.agent.node_controller import NodeController
from tulle.cli import conventions
from tulle.cli.common import UserError
from tulle.cli.conventions import PIPE_CLOSED_STATUS, CliParser, DefaultsHelpFormatter, shows_default
from tulle.cli.main import main
from tulle.dataplane.host import Underlay
from tulle.datastore.base import Datastore
from tulle.datastore.factory import open_datastore
from tulle.datastore.memory import forget_server, memory_server
from tulle.lab.etcd_server import EtcdServer
from tulle.model.kinds import NODE

# -- help ----------------------------------------------------------------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_subcommand_is_listed_in_its_parents_help_with_what_it_does() -> None:
    missing = []
    for path, parser in walk():
        shown = _flat(parser.format_help())
        for action in subparsers_of(parser):
            described = {choice.dest: choice.help for choice in action._choices_actions}
            for name in action.choices:
                words = " ".join(("tulle", *path, name))
                if not described.get(name):
                    missing.append(f"{words}: no help line")
                elif _flat(f"{name} {described[name]}") not in shown:
                    missing.append(f"{words}: not in `{' '.join(('tulle', *path))} --help`")
    assert missing == []


def test_every_argument_says_what_it_does_and_an_option_its_default() -> None:
    missing = []
    for path, parser in walk():
        assert parser.formatter_class is DefaultsHelpFormatter, f"tulle {' '.join(path)}"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            where = f"tulle {' '.join(path)} {name}".replace("  ", " ")
            if not action.help:
                missing.append(f"{where}: no help")
                continue
            shown = formatter._expand_help(action)
            if shows_default(action) and "default" not in shown:
                missing.append(f"{where}: its default {action.default!r} is not shown")
    assert missing == []


def test_the_default_lab_mode_is_said_and_flags_without_a_value_say_no_default() -> None:
    up = dict(walk())[("lab", "up")]
    text = _flat(up.format_help())
    assert "(default: vxlan)" in text
    assert "(default: 3)" in text  # --nodes
    assert "default: False" not in text and "default: None" not in text and "default: []" not in text


# -- a bad flag ----------------------------------------------------------------------------------


def test_a_bad_flag_is_one_line_and_status_2_for_every_command() -> None:
    def bad_flag(command: Command) -> str:
        ran = run(command.argv("h10cnone", bad_flag="--no-such-flag"), timeout=30)
        lines = ran.stderr.splitlines()
        if (
            ran.returncode == 2
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and "--no-such-flag" in lines[0]
            and f"`tulle {command.words} --help`" in lines[0]
        ):
            return ""
        return str(ran)

    # Nothing runs: each is refused while its arguments are parsed (lab up, demo and agent too).
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(bad_flag, commands()) if f]
    assert failures == []


def test_an_unknown_command_and_a_missing_argument_are_one_line() -> None:
    for argv, says in (
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["lab", "pod", "add"], "the following arguments are required: LAB, NODE, NAMESPACE/POD"),
        (["lab"], "the following arguments are required: COMMAND"),
    ):
        ran = run(argv)
        assert ran.returncode == 2 and ran.stderr.count("\n") == 1, str(ran)
        assert ran.stderr.startswith("error: ") and says in ran.stderr, str(ran)


def _parser_running(failure: BaseException, **defaults: object) -> CliParser:
    def command(_args: argparse.Namespace) -> int:
        raise failure

    parser = CliParser(prog="tulle")
    parser.set_defaults(func=command, **defaults)
    return parser


def test_an_expected_error_is_one_line_with_the_commands_error_status_and_a_bug_is_not_hidden(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tulle.lab.state import LabNotFound

    assert conventions.run(_parser_running(LabNotFound("there is no lab named 'x'\n(see `tulle lab up`)")), []) == 1
    assert capsys.readouterr().err == "error: there is no lab named 'x' (see `tulle lab up`)\n"
    # a command whose statuses mean something to scripts gives its errors its own
    assert conventions.run(_parser_running(UserError("no pod x/a"), error_status=2), []) == 2
    assert capsys.readouterr().err == "error: no pod x/a\n"
    with pytest.raises(RuntimeError):  # not expected: a bug, shown with its traceback
        conventions.run(_parser_running(RuntimeError("a bug")), [])


# -- output into a closed pipe ------------------------------------------------------------------


def into_a_pipe_head_has_left(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`tulle ARGV | head -1` where head has already read its line and gone, as it has once a
    long output's first line passed: every write of tulle's meets a pipe nobody reads."""
    read_end, write_end = os.pipe()
    try:
        head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.DEVNULL)
        os.close(read_end)
        read_end = -1
        os.write(write_end, b"the line head takes\n")
        assert head.wait(timeout=10) == 0
        return subprocess.run(
            [TULLE, *argv], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=60
        )
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)


def assert_quiet_end(done: subprocess.CompletedProcess[str]) -> None:
    assert done.stderr == "", done.stderr  # no BrokenPipeError, no 'Exception ignored in ...'
    assert done.returncode == PIPE_CLOSED_STATUS


def test_status_into_a_closed_pipe_ends_quietly(tmp_path: str) -> None:
    # no agent answers there: the report says so in its table, which is written to the pipe
    assert_quiet_end(into_a_pipe_head_has_left(["status", "--socket", os.path.join(str(tmp_path), "none.sock")]))


def test_version_and_help_into_a_closed_pipe_end_quietly() -> None:
    assert_quiet_end(into_a_pipe_head_has_left(["version"]))
    assert_quiet_end(into_a_pipe_head_has_left(["--version"]))
    assert_quiet_end(into_a_pipe_head_has_left(["lab", "up", "--help"]))


def test_policy_trace_into_a_closed_pipe_ends_quietly(etcd_server: EtcdServer, prefix: str) -> None:
    argv = ["policy", "trace", "10.244.0.5", "10.244.0.6", "80/tcp", "--datastore", etcd_server.url]
    assert_quiet_end(into_a_pipe_head_has_left([*argv, "--prefix", prefix]))


@pytest.fixture
def a_long_listing(store: Datastore) -> None:
    """`get ns --show-labels` of about 200 kB in lines of 4 kB: far more than a pipe holds, so
    tulle is still writing when head has its line and leaves."""
    for i in range(50):
        labels = {f"example.com/label{j}": "v" * 63 for j in range(60)}
        store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}", "labels": labels}})


def test_a_long_listing_piped_into_head_ends_quietly(
    etcd_server: EtcdServer, prefix: str, a_long_listing: None
) -> None:
    done = subprocess.run(
        f"set -o pipefail; {TULLE} get ns --show-labels --datastore {etcd_server.url} --prefix {prefix} | head -1",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["NAME", "STATUS", "AGE", "LABELS"]
    assert_quiet_end(done)


# -- version --------------------------------------------------------------------------------------


def test_the_version_is_the_installed_packages() -> None:
    expected = importlib.metadata.version("tulle")
    assert installed_version() == expected
    flag = run(["--version"])
    assert (flag.returncode, flag.stdout, flag.stderr) == (0, f"tulle {expected}\n", "")
    command = run(["version"], env={"TULLE_DATASTORE": ""})
    assert (command.returncode, command.stdout, command.stderr) == (0, f"Client Version: {expected}\n", "")


@pytest.fixture
def memory_store() -> Iterator[tuple[str, Datastore]]:
    name = f"ver-{uuid.uuid4().hex[:8]}"
    memory_server(name)
    store = open_datastore(f"memory://{name}")
    yield f"memory://{name}", store
    store.close()
    forget_server(name)


def test_an_agent_publishes_its_version_on_its_node_and_a_restart_updates_it(
    memory_store: tuple[str, Datastore],
) -> None:
    _, store = memory_store
    store.create(node_object("me", "vxlan", ["172.30.1.11"], [], agent_version="0.0.1"))  # an older agent's
    nodes = Informer(store, NODE, lambda obj: obj)
    underlay = Underlay("uplink", ("172.30.1.11/24",), 1500)
    NodeController(store, "me", "vxlan", underlay, lambda: [], nodes, lease_ttl=5).register()
    node = store.get(NODE, "me")
    assert node is not None
    assert node["metadata"]["annotations"][ANNOTATION_AGENT_VERSION] == installed_version()


def test_version_lists_each_agents_version_and_whether_it_is_alive(
    memory_store: tuple[str, Datastore], capsys: pytest.CaptureFixture[str]
) -> None:
    url, store = memory_store
    store.create(node_object("node1", "vxlan", ["172.30.1.11"], [], agent_version="0.1.0"))
    store.create(node_object("node2", "vxlan", ["172.30.1.12"], [], agent_version="0.0.9"))
    store.create(node_object("node3", "vxlan", ["172.30.1.13"], []))  # registered before versions were
    store.heartbeat("node1", 30).start()
    with pytest.raises(SystemExit) as done:
        main(["version", "--datastore", url])
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0
    assert out[0] == f"Client Version: {installed_version()}"
    assert out[1] == f"Agent Versions (from the Node objects at {url}):"
    assert [line.split()[:3] for line in out[2:]] == [
        ["NODE", "VERSION", "AGENT"],
        ["node1", "0.1.0", "running"],
        ["node2", "0.0.9", "not"],
        ["node3", "unknown", "not"],
    ]
    with pytest.raises(SystemExit):
        main(["version", "--datastore", url, "-o", "json"])
    report = json.loads(capsys.readouterr().out)
    assert report["clientVersion"] == installed_version()
    assert report["agents"][0] == {"node": "node1", "version": "0.1.0", "alive": True}
    assert report["agents"][2] == {"node": "node3", "version": None, "alive": False}


def test_version_with_a_datastore_nobody_answers_says_the_client_version_then_the_error() -> None:
    url = "http://127.0.0.1:9"  # the discard port: nothing listens there
    no_tls = {f"TULLE_DATASTORE_{name}": "" for name in ("CA", "CERT", "KEY")}  # the session etcd's
    ran = run(["version", "--datastore", url, "--insecure-datastore"], env=no_tls)
    assert ran.stdout == f"Client Version: {installed_version()}\n"
    errors = [line for line in ran.stderr.splitlines() if not line.startswith("warning: ")]
    assert ran.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"error: etcd at {url}"), str(ran)
    assert ran.seconds < 10
