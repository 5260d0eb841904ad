"""The in-memory backend: the same contract as etcd, in one process, for tests of the agent's
controllers without root, and of the interface itself (the contract suite runs on both).

Every `MemoryDatastore` opened on one name shares one `MemoryServer`, as clients of one etcd
share it. The server keeps a bounded history of changes to serve watches from a version; a
watch from before the history's start ends with WatchExpired, as a compacted etcd revision
does. Tests can make the server unreachable (every call fails as a timed-out etcd would) and
cut every watch (as an etcd restart does).
"""

from __future__ import annotations

import bisect
import copy
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tulle.datastore.base import (
    Admit,
    AlreadyExists,
    Applied,
    Conflict,
    DatastoreError,
    NodeLiveness,
    NotFound,
    Obj,
    Reachability,
    ReachabilityTracker,
    WatchEvent,
    WatchExpired,
)
from tulle.datastore.objects import NAMESPACE_CASCADE, carry_over, complete, identity, plan_apply
from tulle.model.kinds import NAMESPACE, Kind

ObjectKey = tuple[str, str | None, str]  # (kind, namespace, name)


@dataclass
class _Beat:
    liveness: NodeLiveness
    holder: str
    ttl: int
    expires: float  # time.monotonic()


class MemoryServer:
    """The shared state: objects, a global revision, the recent history, heartbeats."""

    def __init__(self, name: str, history: int = 10_000) -> None:
        self.name = name
        self.history = history
        self.cond = threading.Condition(threading.RLock())
        self.revision = 0
        self.objects: dict[ObjectKey, Obj] = {}
        self.events: list[tuple[int, str, WatchEvent]] = []  # (revision, kind, event), oldest first
        self.compacted = 0  # watches from a revision below this have missed changes
        self.beats: dict[str, _Beat] = {}
        self.reachable = True
        self.watch_epoch = 0  # bumped to cut every watch

    # -- fault injection, for tests ---------------------------------------------------------

    def set_reachable(self, reachable: bool) -> None:
        with self.cond:
            self.reachable = reachable
            self.cond.notify_all()

    def cut_watches(self) -> None:
        with self.cond:
            self.watch_epoch += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: every watch from before now must list again."""
        with self.cond:
            self.events.clear()
            self.compacted = self.revision + 1

    # -- changes ------------------------------------------------------------------------------

    def record(self, kind: Kind, event_type: str, obj: Obj) -> None:
        """Append a change at the current revision (the caller holds the lock)."""
        self.events.append((self.revision, kind.kind, WatchEvent(event_type, copy.deepcopy(obj))))
        if len(self.events) > self.history:
            dropped = len(self.events) - self.history
            self.compacted = self.events[dropped - 1][0] + 1
            del self.events[:dropped]
        self.cond.notify_all()


_SERVERS: dict[str, MemoryServer] = {}
_SERVERS_LOCK = threading.Lock()


def memory_server(name: str) -> MemoryServer:
    """The server of that name in this process, made on first use."""
    with _SERVERS_LOCK:
        if name not in _SERVERS:
            _SERVERS[name] = MemoryServer(name)
        return _SERVERS[name]


def forget_server(name: str) -> None:
    with _SERVERS_LOCK:
        _SERVERS.pop(name, None)


class MemoryWatch:
    def __init__(self, server: MemoryServer, kind: Kind, after: int) -> None:
        self.server = server
        self.kind = kind.kind
        self.position = after
        self.epoch = server.watch_epoch
        self.cancelled = False

    def get(self, timeout: float) -> WatchEvent | None:
        server = self.server
        deadline = time.monotonic() + timeout
        with server.cond:
            while True:
                if self.cancelled:
                    raise DatastoreError("watch cancelled")
                if not server.reachable:
                    raise DatastoreError(f"memory datastore {server.name} is unreachable")
                if server.watch_epoch != self.epoch:
                    raise WatchExpired("the watch was cut")
                if self.position + 1 < server.compacted:
                    raise WatchExpired(f"revision {self.position} was compacted")
                start = bisect.bisect_right(server.events, self.position, key=lambda e: e[0])
                for revision, kind, event in server.events[start:]:
                    self.position = revision
                    if kind == self.kind:
                        return WatchEvent(event.type, copy.deepcopy(event.object))
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                server.cond.wait(left)

    def cancel(self) -> None:
        with self.server.cond:
            self.cancelled = True
            self.server.cond.notify_all()


class MemoryHeartbeat:
    def __init__(self, server: MemoryServer, node: str, ttl: int, check: ReachabilityCheck) -> None:
        self.server = server
        self.node = node
        self.ttl = ttl
        self.holder = uuid.uuid4().hex
        self.started = time.time()
        self._check = check

    def start(self) -> None:
        with self.server.cond:
            self._check()
            liveness = NodeLiveness(self.node, self.started, os.getpid())
            self.server.beats[self.node] = _Beat(liveness, self.holder, self.ttl, time.monotonic() + self.ttl)

    def renew(self) -> bool:
        with self.server.cond:
            self._check()
            beat = self.server.beats.get(self.node)
            if beat is not None and beat.holder == self.holder and beat.expires > time.monotonic():
                beat.expires = time.monotonic() + self.ttl
                return False
        self.start()
        return True


class ReachabilityCheck:
    """Raise DatastoreError, recorded, while the server is unreachable."""

    def __init__(self, server: MemoryServer, tracker: ReachabilityTracker) -> None:
        self.server = server
        self.tracker = tracker

    def __call__(self) -> None:
        if not self.server.reachable:
            error = f"memory datastore {self.server.name} is unreachable"
            self.tracker.failed(error)
            raise DatastoreError(error)
        self.tracker.succeeded()


class MemoryDatastore:
    """The Datastore interface (and AtomicWriter) on a MemoryServer.

    >>> ds = MemoryDatastore(memory_server("doc"))
    >>> ds.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})["metadata"]["name"]
    'web'
    """

    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self._tracker = ReachabilityTracker()
        self._check = ReachabilityCheck(server, self._tracker)
        self.url = f"memory://{server.name}"

    @staticmethod
    def _key(kind: Kind, name: str, namespace: str | None) -> ObjectKey:
        return (kind.kind, (namespace or "default") if kind.namespaced else None, name)

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        with self.server.cond:
            self._check()
            found = self.server.objects.get(self._key(kind, name, namespace))
            return copy.deepcopy(found) if found is not None else None

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        with self.server.cond:
            self._check()
            found = [
                copy.deepcopy(obj)
                for (k, ns, _), obj in sorted(self.server.objects.items(), key=lambda item: str(item[0]))
                if k == kind.kind and (namespace is None or not kind.namespaced or ns == namespace)
            ]
            return found, str(self.server.revision)

    def watch(self, kind: Kind, resource_version: str) -> MemoryWatch:
        with self.server.cond:
            self._check()
            return MemoryWatch(self.server, kind, int(resource_version or 0))

    def _store(self, kind: Kind, key: ObjectKey, obj: Obj, event_type: str) -> Obj:
        server = self.server
        server.revision += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(server.revision)
        server.objects[key] = stored
        server.record(kind, event_type, stored)
        return copy.deepcopy(stored)

    def create(self, obj: Obj) -> Obj:
        stored = complete(obj)
        stored["metadata"].pop("resourceVersion", None)
        kind, namespace, name = identity(stored)
        key = self._key(kind, name, namespace)
        with self.server.cond:
            self._check()
            if key in self.server.objects:
                raise AlreadyExists(f'{kind.kind} "{name}" already exists')
            return self._store(kind, key, stored, "ADDED")

    def update(self, obj: Obj) -> Obj:
        kind, namespace, name = identity(obj)
        key = self._key(kind, name, namespace)
        with self.server.cond:
            self._check()
            current = self.server.objects.get(key)
            if current is None:
                raise NotFound(f'{kind.kind} "{name}" does not exist')
            wanted = obj["metadata"].get("resourceVersion")
            if wanted and str(wanted) != current["metadata"]["resourceVersion"]:
                raise Conflict(f'{kind.kind} "{name}" changed since it was read')
            stored = carry_over(obj, current)
            if kind.namespaced:
                stored["metadata"]["namespace"] = namespace
            return self._store(kind, key, stored, "MODIFIED")

    def _remove(self, kind: Kind, key: ObjectKey) -> None:
        server = self.server
        gone = server.objects.pop(key)
        server.revision += 1
        gone = copy.deepcopy(gone)
        gone["metadata"]["resourceVersion"] = str(server.revision)
        server.record(kind, "DELETED", gone)

    def delete(self, kind: Kind, name: str, namespace: str | None = None, resource_version: str | None = None) -> bool:
        key = self._key(kind, name, namespace)
        with self.server.cond:
            self._check()
            current = self.server.objects.get(key)
            if current is None:
                return False
            if resource_version and str(resource_version) != current["metadata"]["resourceVersion"]:
                raise Conflict(f'{kind.kind} "{name}" changed since it was read')
            self._remove(kind, key)
            return True

    def heartbeat(self, node: str, ttl: int) -> MemoryHeartbeat:
        return MemoryHeartbeat(self.server, node, ttl, self._check)

    def live_nodes(self) -> dict[str, NodeLiveness]:
        with self.server.cond:
            self._check()
            now = time.monotonic()
            return {node: beat.liveness for node, beat in self.server.beats.items() if beat.expires > now}

    @property
    def reachability(self) -> Reachability:
        return self._tracker.state

    def close(self) -> None:
        pass

    # -- AtomicWriter: one lock makes every multi-object write atomic ---------------------------

    def apply_many(self, objects: Sequence[Obj], admit: Admit | None = None, *, dry_run: bool = False) -> Applied:
        with self.server.cond:
            self._check()
            admitted = admit(objects, self) if admit else [copy.deepcopy(o) for o in objects]
            results, writes = plan_apply(admitted, self.get)
            if dry_run:
                return results
            for obj, expected in writes:
                kind, namespace, name = identity(obj)
                event = "ADDED" if expected is None else "MODIFIED"
                stored = self._store(kind, self._key(kind, name, namespace), obj, event)
                obj["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
            return results

    def delete_namespace(self, name: str) -> bool:
        with self.server.cond:
            self._check()
            key = self._key(NAMESPACE, name, None)
            if key not in self.server.objects:
                return False
            self._remove(NAMESPACE, key)
            for kind in NAMESPACE_CASCADE:
                for found in [k for k in self.server.objects if k[0] == kind.kind and k[1] == name]:
                    self._remove(kind, found)
            return True
