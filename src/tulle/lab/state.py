"""Where a lab keeps its state, and how other commands find the lab's datastore."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tulle.cni.files import write_atomically
from tulle.datastore.base import Login, TlsFiles

LABS_DIR = os.environ.get("TULLE_LABS_DIR", "/run/tulle/labs")


def plugin_environment() -> dict[str, str]:
    """What the lab's runtimes add to the plugin's environment: its labs directory as an allowed root
    for the plugin's socket and state paths (a moved TULLE_LABS_DIR is outside the plugin's defaults)."""
    from tulle.cni.plugin import PATH_ROOTS_ENV

    return {PATH_ROOTS_ENV: os.path.normpath(os.path.abspath(LABS_DIR))}


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
    if not os.path.isdir(lab_dir(name)):
        load(name)  # LabNotFound: a typo must not create a lab folder (`lab up` makes it)
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


# The lab's users of its etcd (docs/deployment.md): the CLI as the admin, each agent as itself.
ADMIN_USER = "tulle-admin"


def pki_dir(name: str) -> str:
    """The lab's CA key, etcd's certificate and the root password: for `tulle lab` alone."""
    return os.path.join(lab_dir(name), "pki")


def admin_dir(name: str) -> str:
    return os.path.join(lab_dir(name), "admin")


def credentials_in(directory: str, user: str | None) -> tuple[TlsFiles, Login | None]:
    """A client's TLS files (and login, for `user`) as the lab lays them out in `directory`."""
    tls = TlsFiles(
        ca=os.path.join(directory, "ca.crt"),
        cert=os.path.join(directory, "client.crt"),
        key=os.path.join(directory, "client.key"),
    )
    return tls, Login(user, os.path.join(directory, "password")) if user else None


@dataclass(frozen=True)
class LabDatastore:
    """What a client needs to reach a lab's etcd as the lab's admin."""

    url: str
    tls: TlsFiles
    login: Login | None  # None until the lab has turned etcd's RBAC on


def lab_datastore(state: dict[str, Any]) -> LabDatastore:
    tls, login = credentials_in(admin_dir(state["name"]), ADMIN_USER)
    return LabDatastore(url=str(state["etcd"]["url"]), tls=tls, login=login if state["etcd"].get("rbac") else None)


def enter_lab_datastore(name: str) -> LabDatastore:
    """Move this process into the lab's underlay namespace, where its etcd listens; return the
    URL and the admin's credentials.

    The lab's etcd lives on the underlay (never in the root namespace), so the CLI goes to it.
    """
    from tulle.dataplane.netns import enter_netns

    state = load(name)
    enter_netns(f"/run/netns/{state['underlay']['netns']}")
    return lab_datastore(state)
