"""A lab's lifecycle as a user meets it, through the `tulle` command:

- `lab up` of a name in use says only that the lab exists, and leaves that lab as it is;
- `lab logs LAB NODE` prints the node's agent log; `--follow` goes on printing what the agent
  writes (a restart's lines too) until Ctrl-C, which ends it quietly with status 0;
- `lab down` stops every process that runs in one of the lab's namespaces, also those it did not
  start (a server left running with `lab exec`, one in podman's `netns-<uuid>`, one that ignores
  SIGTERM), and removes podman's namespaces with its own, even when the lab's records are lost;
  then the lab is not there: `lab down` again fails, unless --ignore-not-found.

One 1-node lab for the tests that leave it running; each `lab down` test has a lab of its own.
Without a lab: tests/unit/test_lab_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.clilib import TULLE, one_error_line, run
from tulle.lab import state as lab_state
from tulle.lab import topology
from tulle.lab.cluster import Lab
from tulle.lab.etcd_server import pid_alive

from ..lablib import lab_leftovers, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]


def lab_name() -> str:
    return f"h10a{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(lab_name())
    try:
        lab.up(nodes=1, mode="vxlan", ipv4_only=True)
        yield lab
    finally:
        lab.down()


@pytest.fixture
def own_lab() -> Iterator[Lab]:
    """A 1-node lab for a test that takes it down; taken down at the end if the test did not."""
    lab = Lab(lab_name())
    try:
        lab.up(nodes=1, mode="vxlan", ipv4_only=True)
        yield lab
    finally:
        down = run(["lab", "down", lab.name, "--ignore-not-found"], timeout=180)
        assert down.returncode == 0, str(down)


def test_lab_up_of_a_name_in_use_says_only_that_the_lab_exists_and_leaves_it_as_it_is(lab: Lab) -> None:
    with open(lab_state.state_path(lab.name)) as f:
        books = f.read()
    namespaces = topology.lab_namespaces(lab.name)
    ran = run(["lab", "up", lab.name, "--nodes", "2"])
    assert ran.returncode == 1 and ran.stdout == "", str(ran)
    assert one_error_line(ran) == f"error: lab '{lab.name}' exists already"
    with open(lab_state.state_path(lab.name)) as f:
        assert f.read() == books
    assert topology.lab_namespaces(lab.name) == namespaces
    assert pid_alive(state(lab)["nodes"]["node1"]["pid"]) and pid_alive(state(lab)["etcd"]["pid"])


def _messages(lines: list[str]) -> list[str]:
    """The `msg` of each of the agent's log lines (one JSON object a line)."""
    found = []
    for line in lines:
        try:
            found.append(str(json.loads(line).get("msg")))
        except ValueError:
            pass
    return found


def test_lab_logs_prints_the_agents_log_and_follow_goes_on_until_ctrl_c(lab: Lab) -> None:
    shown = run(["lab", "logs", lab.name, "node1"])
    assert shown.returncode == 0 and shown.stderr == "", str(shown)
    with open(lab.agent_log("node1")) as f:
        assert f.read().startswith(shown.stdout)
    ready = _messages(shown.stdout.splitlines()).count("ready")
    assert ready >= 1 and _messages(shown.stdout.splitlines())[0] == "starting"

    missing = run(["lab", "logs", lab.name, "node9"])
    assert one_error_line(missing) == f"error: lab {lab.name} has no node node9 (nodes: node1)"

    follow = subprocess.Popen(
        [TULLE, "lab", "logs", lab.name, "node1", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: _messages(lines).count("ready") == ready, timeout=30)
        restarted = run(["lab", "node", "restart-agent", lab.name, "node1"])
        assert restarted.returncode == 0, str(restarted)
        # what the agent wrote after the follow began: a new start, up to ready again
        assert wait_until(lambda: _messages(lines).count("ready") == ready + 1, timeout=30), lines
        assert follow.poll() is None  # still following
        follow.send_signal(signal.SIGINT)  # Ctrl-C
        assert follow.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert follow.stderr is not None and follow.stderr.read() == ""
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def _left_running(argv: list[str], command: str) -> int:
    """Run `command` through argv (`tulle lab exec ...`, `nsenter ...`) as a server left running
    is: in the background, in a session of its own, detached from the command that started it,
    which ends at once. Its PID."""
    script = f"setsid {command} </dev/null >/dev/null 2>&1 & echo $!"
    started = subprocess.run([*argv, "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout)
    assert pid_alive(pid)
    return pid


def _processes_in(netns: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True)
    return [int(pid) for pid in listed.stdout.split()]


def test_lab_down_stops_every_process_in_the_labs_namespaces_and_removes_podmans_namespaces(own_lab: Lab) -> None:
    lab = own_lab
    assert run(["lab", "pod", "add", lab.name, "node1", "x/web"]).returncode == 0
    assert run(["lab", "pod", "add", lab.name, "node1", "default/box", "--runtime", "podman"]).returncode == 0
    podman_netns = state(lab)["pods"]["default/box"]["netns"]
    assert os.path.basename(podman_netns).startswith("netns-")
    container = _processes_in(os.path.basename(podman_netns))
    assert container  # podman's container process
    exec_in = [TULLE, "lab", "exec", lab.name]
    orphans = [
        _left_running([*exec_in, "x/web", "--"], "sleep 600"),
        _left_running([*exec_in, "x/web", "--"], "sh -c 'trap \"\" TERM; exec sleep 600'"),  # ignores SIGTERM
        _left_running([*exec_in, "default/box", "--"], "sleep 600"),  # in podman's namespace
        _left_running(["nsenter", f"--net=/run/netns/{lab.names.node('node1')}"], "sleep 600"),  # on the node
    ]
    own = [state(lab)["nodes"]["node1"]["pid"], state(lab)["etcd"]["pid"]]

    down = run(["lab", "down", lab.name], timeout=180)
    assert down.returncode == 0 and down.stdout == f"lab {lab.name} is down\n", str(down)
    assert [pid for pid in orphans + container + own if pid_alive(pid)] == []
    assert not os.path.exists(podman_netns)
    assert lab_leftovers(lab.name) == []

    # Down, the lab is not there.
    again = run(["lab", "down", lab.name])
    assert one_error_line(again) == f"error: there is no lab named '{lab.name}' on this machine"
    ignored = run(["lab", "down", lab.name, "--ignore-not-found"])
    assert (ignored.returncode, ignored.stdout, ignored.stderr) == (0, "", ""), str(ignored)


def test_lab_down_without_the_labs_records_still_finds_podmans_namespace_and_every_process(own_lab: Lab) -> None:
    lab = own_lab
    assert run(["lab", "pod", "add", lab.name, "node1", "default/box", "--runtime", "podman"]).returncode == 0
    podman_netns = state(lab)["pods"]["default/box"]["netns"]
    running = _processes_in(os.path.basename(podman_netns)) + _processes_in(lab.names.node("node1"))
    running += [state(lab)["etcd"]["pid"]]
    os.remove(lab_state.state_path(lab.name))  # lab.json lost: no PID, no pod, no podman namespace named

    down = run(["lab", "down", lab.name], timeout=180)
    assert down.returncode == 0, str(down)
    assert [pid for pid in running if pid_alive(pid)] == []
    assert not os.path.exists(podman_netns)
    assert lab_leftovers(lab.name) == []
