"""The datastore interface: the one contract every backend (etcd, later the Kubernetes API) keeps.

Invariants (docs/design/datastore.md):
- every value carries the revision of its last change (`mod_revision`);
- `update` and `delete` with an expected revision are compare-and-swap: they change nothing
  and return False when somebody changed the key since;
- `create` succeeds for exactly one caller when several race on one key;
- `watch(prefix, revision)` delivers every change after `revision` in order, so that
  `list` followed by `watch` from the listed revision misses nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class DatastoreError(Exception):
    """The datastore could not be reached or refused a request."""


class WatchExpired(DatastoreError):
    """The requested revision was compacted: list again and watch from the new revision."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    key: str
    value: bytes  # empty for deletes
    mod_revision: int


@dataclass(frozen=True)
class PutOp:
    """Put `key` in a transaction; with `expected_revision`, only if its mod_revision is that
    (0: only if the key does not exist)."""

    key: str
    value: bytes
    expected_revision: int | None = None
    lease: int = 0


@dataclass(frozen=True)
class DeleteOp:
    """Delete `key` (every key under it when `prefix`); with `expected_revision`, only if the
    key is still at that mod_revision."""

    key: str
    expected_revision: int | None = None
    prefix: bool = False


@dataclass(frozen=True)
class UnchangedOp:
    """Write nothing; the transaction goes through only if the key (every key under it when
    `prefix`) was not created or changed after `revision`. A single key must still be at
    `revision` exactly (0: must not exist); under a prefix, deletions are not seen."""

    key: str
    revision: int
    prefix: bool = False


TxnOp = PutOp | DeleteOp | UnchangedOp


@dataclass(frozen=True)
class Reachability:
    """Whether the last call reached the datastore, since when (wall-clock time), and why not."""

    reachable: bool
    since: float
    error: str = ""

    def describe(self) -> str:
        """'' when reachable; otherwise the cause as a status line says it."""
        if self.reachable:
            return ""
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"datastore unreachable since {when}: {self.error}"


class ReachabilityTracker:
    """The outcome of every call, kept by a backend so that a status report never waits on the
    datastore: it reads when the datastore last stopped (or started again) answering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = Reachability(reachable=True, since=time.time())

    def succeeded(self) -> Reachability | None:
        """Record a call that got an answer; returns the outage it ends, if one did."""
        with self._lock:
            if self._state.reachable:
                return None
            ended, self._state = self._state, Reachability(reachable=True, since=time.time())
            return ended

    def failed(self, error: str) -> bool:
        """Record a call that got no answer; True if this begins an outage."""
        with self._lock:
            began = self._state.reachable
            since = time.time() if began else self._state.since
            self._state = Reachability(reachable=False, since=since, error=error)
            return began

    @property
    def state(self) -> Reachability:
        with self._lock:
            return self._state


class Watch(Protocol):
    def __iter__(self) -> Iterator[WatchEvent]: ...

    def cancel(self) -> None: ...


class Datastore(Protocol):
    def get(self, key: str) -> KeyValue | None:
        """The key's value and revision, or None."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[KeyValue | None]:
        """Each key's value and revision (None where absent), read together in one round trip."""
        ...

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under prefix and the store revision they were read at."""
        ...

    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under prefix from start_revision on (inclusive)."""
        ...

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Put the key only if it does not exist; True if this call created it."""
        ...

    def update(self, key: str, value: bytes, expected_revision: int, lease: int = 0) -> bool:
        """Compare-and-swap: put only if the key's mod_revision is still expected_revision."""
        ...

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put; returns the new revision."""
        ...

    def delete(self, key: str, expected_revision: int | None = None) -> bool:
        """Delete the key (only at expected_revision when given); True if it was deleted."""
        ...

    def commit(self, ops: Sequence[TxnOp]) -> int | None:
        """All the ops in one transaction: every write or none. Returns the store revision after
        it (all writes carry it), or None if a condition failed and nothing was written."""
        ...

    def grant_lease(self, ttl_seconds: int) -> int:
        """A new lease; keys put with it vanish when it is not kept alive."""
        ...

    def keepalive(self, lease: int) -> int:
        """Refresh the lease; returns the remaining TTL, or -1 if it already expired."""
        ...

    def revoke_lease(self, lease: int) -> None:
        """End the lease now; keys put with it are deleted. A lease that is gone already is fine."""
        ...

    @property
    def reachability(self) -> Reachability:
        """What the last call found: answered, or unreachable since when and why (no I/O)."""
        ...

    def close(self) -> None: ...
