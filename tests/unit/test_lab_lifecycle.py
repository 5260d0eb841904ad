"""The lab's lifecycle where no lab is needed: `lab up` refuses a node count it cannot make before
it makes anything, `lab down` of a lab that is not there fails unless --ignore-not-found, and a
log is followed as `tail -F` follows it. With a lab: tests/e2e/test_lab_lifecycle.py."""

from __future__ import annotations

import io
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clilib import one_error_line, run
from tests.lablib import wait_until
from tulle.lab import state as lab_state
from tulle.lab import topology
from tulle.lab.cluster import Lab, LabError
from tulle.lab.logs import follow_log, print_log


def _nothing_of(name: str) -> bool:
    return not os.path.exists(lab_state.lab_dir(name)) and topology.lab_namespaces(name) == []


def _unused_lab_name() -> str:
    name = f"h10a{secrets.token_hex(2)}"
    assert _nothing_of(name)
    return name


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (["--nodes", "0"], "argument --nodes: a lab has 1 to 244 nodes, not 0"),
        (["--nodes", "-1"], "argument --nodes: a lab has 1 to 244 nodes, not -1"),
        (["--nodes=-3"], "argument --nodes: a lab has 1 to 244 nodes, not -3"),
        (["--nodes", "245"], "argument --nodes: a lab has 1 to 244 nodes, not 245"),
        (["--nodes", "two"], "argument --nodes: 'two' is not a whole number"),
        (["--nodes", "1.5"], "argument --nodes: '1.5' is not a whole number"),
    ],
)
def test_lab_up_refuses_a_node_count_it_cannot_make_naming_the_option_and_makes_nothing(
    given: list[str], says: str
) -> None:
    name = _unused_lab_name()
    ran = run(["lab", "up", name, *given])
    assert ran.returncode == 2, str(ran)
    assert one_error_line(ran) == f"error: {says} (see `tulle lab up --help`)"
    assert _nothing_of(name)


def test_the_lab_library_refuses_a_node_count_before_it_makes_anything() -> None:
    name = _unused_lab_name()
    for nodes in (0, -1, topology.MAX_NODE_INDEX + 1):
        with pytest.raises(LabError, match=f"^nodes: a lab has 1 to 244 nodes, not {nodes}$"):
            Lab(name).up(nodes=nodes, mode="vxlan")
        assert _nothing_of(name)


def test_lab_down_of_a_lab_that_is_not_there_fails_unless_told_to_ignore_it() -> None:
    name = _unused_lab_name()
    ran = run(["lab", "down", name])
    assert ran.returncode == 1 and ran.stdout == "", str(ran)
    assert one_error_line(ran) == f"error: there is no lab named '{name}' on this machine"
    ignored = run(["lab", "down", name, "--ignore-not-found"])
    assert (ignored.returncode, ignored.stdout, ignored.stderr) == (0, "", ""), str(ignored)
    assert _nothing_of(name)


@pytest.fixture
def followed(tmp_path: Path) -> Iterator[tuple[Path, io.BytesIO, threading.Thread]]:
    """A log with two lines, followed by a thread; the log is removed at the end, which ends it."""
    log = tmp_path / "agent.log"
    log.write_text("one\ntwo\n")
    out = io.BytesIO()
    follower = threading.Thread(target=follow_log, args=(str(log), out, 0.01), daemon=True)
    follower.start()
    try:
        yield log, out, follower
    finally:
        log.unlink(missing_ok=True)
        follower.join(timeout=10)


def test_print_log_writes_the_log_as_it_is(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_bytes(b'{"msg": "starting"}\n' * 10000)
    out = io.BytesIO()
    print_log(str(log), out)
    assert out.getvalue() == log.read_bytes()


def test_following_a_log_prints_it_then_what_is_appended_and_ends_when_it_is_removed(
    followed: tuple[Path, io.BytesIO, threading.Thread],
) -> None:
    log, out, follower = followed
    assert wait_until(lambda: out.getvalue() == b"one\ntwo\n")
    with log.open("a") as f:
        f.write("three\n")
    assert wait_until(lambda: out.getvalue() == b"one\ntwo\nthree\n")
    assert follower.is_alive()
    log.unlink()
    follower.join(timeout=10)
    assert not follower.is_alive()  # the node or the lab went away: so does the follow


def test_following_a_log_reads_it_again_from_its_start_when_it_is_cut_short_or_replaced(
    followed: tuple[Path, io.BytesIO, threading.Thread],
) -> None:
    log, out, _ = followed
    assert wait_until(lambda: out.getvalue() == b"one\ntwo\n")
    log.write_text("new\n")  # truncated, then written
    assert wait_until(lambda: out.getvalue() == b"one\ntwo\nnew\n")
    replacement = log.with_name("agent.log.new")
    replacement.write_text("another\n")
    replacement.replace(log)
    assert wait_until(lambda: out.getvalue() == b"one\ntwo\nnew\nanother\n")
