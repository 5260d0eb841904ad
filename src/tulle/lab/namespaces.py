"""A lab's network namespaces as the kernel knows them: the ones it names after itself, podman's
(`netns-<uuid>`) for its containers, and every process that runs in any of them.

A process the lab did not start (`tulle lab exec demo shop/web -- setsid server &`) is in no
record, and a network namespace stays alive as long as a process runs in it, after its name is
deleted: such a process would outlive `lab down` as an orphan on a network nobody can reach. So
`lab down` finds them as `ip netns pids` does, by comparing /proc/PID/ns/net with each namespace,
and stops them by PID. A namespace is held open from before the lab's own processes are stopped
until after its name is deleted: an open namespace cannot be freed, so its identity cannot pass to
a namespace made meanwhile by someone else, whose processes would then be taken for the lab's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Collection, Iterable, Mapping
from types import TracebackType

NetnsId = tuple[int, int]  # (st_dev, st_ino) of a namespace file: what identifies a network namespace
PODMAN_NETNS_PREFIX = "netns-"  # podman 4 names its containers' namespaces netns-<uuid>


def pids_in(namespaces: Collection[NetnsId], netns_of: Mapping[int, NetnsId], spared: Collection[int]) -> list[int]:
    """The processes, of those `netns_of` maps to their namespace, that run in one of `namespaces`,
    except the `spared` ones.

    >>> pids_in({(4, 101)}, {1: (4, 1), 40: (4, 101), 41: (4, 102), 42: (4, 101)}, spared={42})
    [40]
    """
    wanted = set(namespaces)
    return sorted(pid for pid, netns in netns_of.items() if netns in wanted and pid not in spared)


def podman_namespaces_linked_to(node_netns: str) -> list[str]:
    """The podman namespaces (`netns-<uuid>`) the named namespace has a link into: a container's
    veth has its other end in its node, and the kernel gives the container's namespace an id
    there. Found this way, a container's namespace is the lab's even when no record names it."""
    proc = subprocess.run(["ip", "-j", "-n", node_netns, "netns", "list-id"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []  # the node is gone: so are the links into it
    names = {str(entry.get("name", "")) for entry in json.loads(proc.stdout)}
    return sorted(name for name in names if name.startswith(PODMAN_NETNS_PREFIX))


class HeldNamespaces:
    """Network namespaces held open by a file descriptor each, for as long as the `with` lasts."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._fds: list[int] = []
        self.ids: set[NetnsId] = set()
        for path in dict.fromkeys(paths):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # gone already
            self._fds.append(fd)
            status = os.fstat(fd)
            self.ids.add((status.st_dev, status.st_ino))

    def __enter__(self) -> HeldNamespaces:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _netns_of(pid: int) -> NetnsId | None:
    try:
        status = os.stat(f"/proc/{pid}/ns/net")
    except OSError:  # gone, or a zombie: it has no namespaces left
        return None
    return status.st_dev, status.st_ino


def process_namespaces() -> dict[int, NetnsId]:
    """Every process on the machine with the network namespace it runs in."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            netns = _netns_of(int(entry))
            if netns is not None:
                found[int(entry)] = netns
    return found


def self_and_ancestors() -> set[int]:
    """This process and the ones it was started by: `lab down` run from a shell inside one of the
    lab's namespaces must not stop that shell, or itself."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def stop_processes_in(namespaces: Collection[NetnsId], grace: float = 3.0) -> list[int]:
    """Stop every process that runs in one of `namespaces`, by PID: SIGTERM (and SIGCONT, for one
    that is paused), then SIGKILL for those still running after `grace` seconds. Returns their PIDs.

    Each is signalled through a pidfd opened before its namespace is checked once more, so that a
    PID reused meanwhile by a process elsewhere is never signalled."""
    pidfds: dict[int, int] = {}
    try:
        for pid in pids_in(namespaces, process_namespaces(), spared=self_and_ancestors()):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if _netns_of(pid) not in namespaces:
                os.close(fd)
                continue
            pidfds[pid] = fd
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            running = _running(pidfds)
            for pid in running:
                _send(pidfds[pid], sig)
                if sig == signal.SIGTERM:
                    _send(pidfds[pid], signal.SIGCONT)
            deadline = time.monotonic() + wait
            while running and time.monotonic() < deadline:
                time.sleep(0.05)
                running = _running(pidfds)
            if not running:
                break
        return sorted(pidfds)
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _running(pidfds: Mapping[int, int]) -> list[int]:
    """The PIDs whose process has not exited (a pidfd turns readable when its process exits)."""
    poll = select.poll()
    for fd in pidfds.values():
        poll.register(fd, select.POLLIN)
    exited = {fd for fd, _ in poll.poll(0)}
    return [pid for pid, fd in pidfds.items() if fd not in exited]


def _send(pidfd: int, sig: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass  # it has exited meanwhile
