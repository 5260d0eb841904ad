"""Every `tulle` command, found by walking build_parser()'s tree, meets what a user meets and
answers in one line, `error: ...`, with a non-zero exit status and no traceback, within 10 s:

- a lab that does not exist (`--lab NAME`, or the lab's name where the command takes it), and
  nothing is created for it;
- a lab whose etcd is stopped (`tulle lab etcd stop`): a command that needs the datastore names
  the URL it tried; one that does not need it does its work.

A bad flag needs no lab: tests/unit/test_cli_conventions.py. One lab for the module: each test
leaves it running, with its etcd up.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.clilib import Command, Path, Ran, commands, one_error_line, run, takes_lab_option
from tulle.agent.node import installed_version
from tulle.lab import state as lab_state

from ..lablib import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

ANSWER_WITHIN_S = 10.0
MISSING_LAB = "h10cnone"

# Commands left out, and why. What they take is still checked for a bad flag (unit tests).
NO_LAB = {
    ("agent",): "takes no lab: it runs on a machine, given a datastore URL",
    ("install-cni",): "takes no lab or datastore: it writes this host's CNI plugin and configuration",
}
MAKES_ITS_LAB = {
    ("lab", "up"): "a missing lab is what it makes (its refusals: tests/e2e/test_lab_lifecycle.py)",
    ("demo",): "makes a 3-node lab of its own and runs traffic for a minute",
}
LEFT_OUT_WITH_ETCD_STOPPED = {
    ("lab", "down"): "removes the lab these tests share, with or without etcd; the fixture's teardown runs it",
    ("lab", "etcd", "start"): "brings the stopped etcd back: run last, as the end of that test",
}

# With the lab's etcd stopped, what a command that does not need it does: (exit status, a word
# its output must contain).
WITHOUT_ETCD: dict[Path, tuple[int, str]] = {
    ("lab", "status"): (0, "STOPPED"),  # says so
    ("lab", "etcd", "stop"): (0, "stopped"),  # is stopped already
    ("lab", "etcd", "pause"): (1, "not running"),
    ("lab", "etcd", "resume"): (1, "not running"),
    ("lab", "exec"): (0, ""),  # in the pod's namespace, which needs no etcd
    ("lab", "logs"): (0, ""),  # the agent's log file
    ("lab", "kubeconfig"): (1, "runs no Kubernetes"),  # a file of the lab, which needs no etcd
    ("lab", "pod", "del"): (0, "deleted"),  # the Pod object is owed until etcd answers (README)
    ("lab", "node", "del"): (1, "no node node9"),  # refused before etcd is asked
}
# `tulle status` asks the agents, who report the outage in its table (README: "During an outage
# `tulle status` answers at once with `datastore unreachable since HH:MM:SS`").
REPORTS_THE_OUTAGE = {("status",)}
# Arguments other than the plausible ones (tests/clilib.py), so that each command does its part:
# `pod del` of a pod `exec` does not need, a node that does not exist for `node del`, a new one
# for `node add`.
VALUES: dict[Path, dict[str, list[str]]] = {
    ("lab", "pod", "del"): {"pod": ["x/b"]},
    ("lab", "pod", "add"): {"pod": ["x/c"]},
    ("lab", "node", "del"): {"node": ["node9"]},
    ("lab", "node", "add"): {"node": ["node3"]},
    ("lab", "node", "restart-agent"): {"node": ["node2"]},
}


@dataclass(frozen=True)
class SharedLab:
    name: str
    etcd_url: str
    values: dict[str, list[str]]  # plausible values for this lab: a file of objects for apply -f


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedLab]:
    name = f"h10c{secrets.token_hex(2)}"
    objects = tmp_path_factory.mktemp("objects") / "objects.yaml"
    objects.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n")
    try:
        up = run(["lab", "up", name, "--nodes", "2", "--mode", "vxlan", "--ipv4-only", "--json"], timeout=180)
        assert up.returncode == 0, str(up)
        for pod in ("x/a", "x/b"):
            added = run(["lab", "pod", "add", name, "node1", pod])
            assert added.returncode == 0, str(added)
        yield SharedLab(name, json.loads(up.stdout)["etcd"], {"filename": [str(objects)]})
    finally:
        down = run(["lab", "down", name], timeout=180)
        assert down.returncode == 0, str(down)


def classified(command: Command, *tables: dict[Path, str]) -> bool:
    return any(command.path in table for table in tables)


def test_version_names_each_agents_version(lab: SharedLab) -> None:
    ran = run(["version", "--lab", lab.name])
    assert ran.returncode == 0, str(ran)
    lines = ran.stdout.splitlines()
    assert lines[0] == f"Client Version: {installed_version()}"
    assert lines[1] == f"Agent Versions (from the Node objects at {lab.etcd_url}):"
    rows = [line.split() for line in lines[3:]]
    assert [row[:3] for row in rows] == [
        ["node1", installed_version(), "running"],
        ["node2", installed_version(), "running"],
    ]


def test_every_command_says_in_one_line_that_there_is_no_such_lab(lab: SharedLab) -> None:
    problems = []
    for command in commands():
        if classified(command, NO_LAB, MAKES_ITS_LAB):
            continue
        argv = command.argv(MISSING_LAB, values=lab.values)
        if MISSING_LAB not in argv:
            problems.append(f"`tulle {command.words}` takes no lab: add it to NO_LAB with a reason")
            continue
        ran = run(argv)
        try:
            line = one_error_line(ran)
            assert MISSING_LAB in line and "no lab" in line, str(ran)
            assert ran.seconds < ANSWER_WITHIN_S, str(ran)
        except AssertionError as exc:
            problems.append(str(exc))
    assert problems == []
    assert not os.path.exists(lab_state.lab_dir(MISSING_LAB))  # a typo makes no lab folder


def _with_etcd_stopped(lab: SharedLab, command: Command) -> Ran:
    values = dict(lab.values, **VALUES.get(command.path, {}))
    ran = run(command.argv(lab.name, values=values))
    assert "Traceback" not in ran.stderr, str(ran)
    assert ran.seconds < ANSWER_WITHIN_S, str(ran)
    if command.path in WITHOUT_ETCD:
        status, says = WITHOUT_ETCD[command.path]
        assert ran.returncode == status and says in ran.stdout + ran.stderr, str(ran)
        assert ran.returncode == 0 or one_error_line(ran)
    elif command.path in REPORTS_THE_OUTAGE:
        assert ran.returncode != 0 and ran.stderr == "", str(ran)
    else:
        assert takes_lab_option(command.parser) or command.path[0] == "lab", f"classify `tulle {command.words}`"
        assert lab.etcd_url in one_error_line(ran), str(ran)
    return ran


def test_with_etcd_stopped_every_command_fails_in_one_line_naming_the_url_or_does_without(lab: SharedLab) -> None:
    stopped = run(["lab", "etcd", "stop", lab.name])
    assert stopped.returncode == 0, str(stopped)
    problems = []
    try:
        for command in commands():
            if classified(command, NO_LAB, MAKES_ITS_LAB, LEFT_OUT_WITH_ETCD_STOPPED):
                continue
            if command.path in REPORTS_THE_OUTAGE:
                # the agents notice at their next call to etcd (a heartbeat, within a third of the lease)
                def reports(command: Command = command) -> bool:
                    ran = _with_etcd_stopped(lab, command)
                    return "datastore unreachable since" in ran.stdout and lab.etcd_url in ran.stdout

                if not wait_until(reports, timeout=30, interval=1):
                    problems.append(f"`tulle {command.words}` does not report the outage")
                continue
            try:
                _with_etcd_stopped(lab, command)
            except AssertionError as exc:
                problems.append(str(exc))
    finally:
        started = run(["lab", "etcd", "start", lab.name])
    assert problems == []
    assert started.returncode == 0 and "is running" in started.stdout, str(started)
    assert wait_until(lambda: run(["get", "ns", "--lab", lab.name]).returncode == 0, timeout=30)
