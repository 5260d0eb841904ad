"""Where a lab keeps its state, and how other commands find the lab's datastore."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tulle.cni.files import write_atomically

LABS_DIR = os.environ.get("TULLE_LABS_DIR", "/run/tulle/labs")


class LabNotFound(Exception):
    pass


def lab_dir(name: str) -> str:
    return os.path.join(LABS_DIR, name)


def state_path(name: str) -> str:
    return os.path.join(lab_dir(name), "lab.json")


def load(name: str) -> dict[str, Any]:
    try:
        with open(state_path(name)) as f:
            state: dict[str, Any] = json.load(f)
            return state
    except FileNotFoundError:
        raise LabNotFound(f"there is no lab named {name!r} (see `tulle lab up`)") from None


def save(name: str, state: dict[str, Any]) -> None:
    write_atomically(state_path(name), json.dumps(state, indent=2, sort_keys=True).encode(), mode=0o644)


@contextmanager
def locked(name: str) -> Iterator[dict[str, Any]]:
    """The lab's state, locked against other `tulle lab` commands, saved on exit."""
    os.makedirs(lab_dir(name), exist_ok=True)
    with open(os.path.join(lab_dir(name), ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = load(name)
        except LabNotFound:
            state = {}
        yield state
        if state:
            save(name, state)


@contextmanager
def exclusive(name: str, what: str) -> Iterator[None]:
    """A lock of its own for one part of the lab (one node's agent, the etcd server).

    Stopping and starting a process must not run twice at once (two agents on one node), yet
    waiting for a process to stop must not hold the lab-wide lock that every pod add and
    delete takes. Order: take this lock before `locked`, never while holding it."""
    load(name)  # no lab, no lock file: a typo must not create a lab folder
    with open(os.path.join(lab_dir(name), f".lock-{what}"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def enter_lab_datastore(name: str) -> str:
    """Move this process into the lab's underlay namespace, where its etcd listens; return the URL.

    The lab's etcd lives on the underlay (never in the root namespace), so the CLI goes to it.
    """
    from tulle.dataplane.netns import enter_netns

    state = load(name)
    enter_netns(f"/run/netns/{state['underlay']['netns']}")
    return str(state["etcd"]["url"])
