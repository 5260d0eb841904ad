"""The datastore interface: the one contract every backend keeps (etcd, in memory, and the
Kubernetes API next).

It speaks Kubernetes-shaped objects (apiVersion, kind, metadata, spec, status), addressed by
(kind, namespace, name), as the API server does. Invariants (docs/design/datastore.md):
- every object carries `metadata.resourceVersion`, an opaque string that changes with every
  write; `update` and `delete` given one are compare-and-swap: they change nothing and raise
  Conflict when somebody wrote the object since;
- `create` succeeds for exactly one caller when several race on one name (AlreadyExists);
- `list` returns the resourceVersion it read at, and `watch(kind, that version)` delivers every
  change after it, in order, so that list-then-watch misses nothing; a version too old to
  watch from ends the watch with WatchExpired: list again;
- every failure to reach the datastore is DatastoreError, never a transport's own exception,
  and is recorded in `reachability` so that a status report never has to ask the datastore;
- a node's liveness is a heartbeat with an expiry (`heartbeat`, `live_nodes`), apart from its
  Node object; keys, revisions and leases are the etcd backend's business alone.

Writes the agent and IPAM make use only single-object optimistic concurrency, so that they run
unchanged on the Kubernetes API. Multi-object atomic writes (`AtomicWriter`) are a convenience
the CLI uses where a backend offers them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tulle.model.kinds import Kind
from tulle.model.kinds import Obj as Obj  # re-exported: backends and callers take them from here
from tulle.model.kinds import Reader as Reader

DEFAULT_PREFIX = "/tulle"


class DatastoreError(Exception):
    """The datastore could not be reached, or failed to answer."""


class WatchExpired(DatastoreError):
    """The watch's resourceVersion is too old (compacted, or the watch was cut): list again."""


class CredentialsError(DatastoreError):
    """A credential of this client is missing, unreadable, malformed, wrong or expired, or the
    datastore refused it: one line that names the file and the reason, for the user to act on."""


@dataclass(frozen=True)
class TlsFiles:
    """A client's TLS files: the CA bundle that signed the datastore's server certificate and
    this client's, this client's certificate, and its private key (PEM, unencrypted, mode 0600).
    They are read again whenever they change, so rotating them is replacing them."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class Login:
    """A datastore user and the file that holds its password (etcd's RBAC: etcd's JSON gateway
    cannot take a user from a client certificate, docs/deployment.md). The file is read again
    whenever it changes."""

    user: str
    password_file: str


class Conflict(Exception):
    """The object changed since it was read (its resourceVersion moved on)."""


class AlreadyExists(Conflict):
    """`create` of an object that exists."""


class NotFound(Conflict):
    """`update` of an object that does not exist."""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "ADDED", "MODIFIED" or "DELETED"
    object: Obj  # for DELETED, the object as it last was

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class Watch(Protocol):
    def get(self, timeout: float) -> WatchEvent | None:
        """The next event, or None after `timeout` seconds; raises WatchExpired or DatastoreError
        when the stream ended (list again, then watch from the listed version)."""
        ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class NodeLiveness:
    """What a live node's heartbeat says about the agent that keeps it."""

    node: str
    started: float  # when that agent started (wall clock)
    pid: int


class Heartbeat(Protocol):
    """One node's heartbeat: `start` once (it replaces an earlier agent's), then `renew` often
    enough for its TTL. Keeping it alive costs no watch event."""

    def start(self) -> None: ...

    def renew(self) -> bool:
        """Keep it alive; True if it had expired (an outage longer than the TTL) and was begun
        again. Raises DatastoreError when the datastore is away."""
        ...


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


class Datastore(Protocol):
    @property
    def url(self) -> str:
        """Where it is, for messages (no credentials)."""
        ...

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        """The object, or None."""
        ...

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        """Every object of the kind (in one namespace, if given) and the resourceVersion they
        were read at, to watch from."""
        ...

    def watch(self, kind: Kind, resource_version: str) -> Watch:
        """Every change to objects of the kind after `resource_version`, in order."""
        ...

    def create(self, obj: Obj) -> Obj:
        """Create the object (uid and creationTimestamp filled in); AlreadyExists if it exists.
        Returns it as stored, with its resourceVersion."""
        ...

    def update(self, obj: Obj) -> Obj:
        """Replace the object: compare-and-swap on metadata.resourceVersion when it is set
        (Conflict if it moved on), unconditionally when it is not; NotFound if it does not
        exist. Keeps uid and creationTimestamp. Returns it as stored."""
        ...

    def delete(self, kind: Kind, name: str, namespace: str | None = None, resource_version: str | None = None) -> bool:
        """Delete the object (only at `resource_version` when given: Conflict if it moved on);
        False if there was none."""
        ...

    def heartbeat(self, node: str, ttl: int) -> Heartbeat:
        """The heartbeat of `node`'s agent, alive for `ttl` seconds after each renewal."""
        ...

    def live_nodes(self) -> dict[str, NodeLiveness]:
        """The nodes whose heartbeat has not expired."""
        ...

    @property
    def reachability(self) -> Reachability:
        """What the last call found: answered, or unreachable since when and why (no I/O)."""
        ...

    def close(self) -> None: ...


Applied = list[tuple[Obj, str]]  # (object as stored, "created" | "configured" | "unchanged")
Admit = Callable[[Sequence[Obj], Reader], list[Obj]]


class PartlyApplied(Exception):
    """A batched apply stopped after writing some batches: another writer changed what a later
    batch had read. `applied` holds what was written, `cause` why the rest was not."""

    def __init__(self, applied: Applied, cause: Exception) -> None:
        self.applied = applied
        self.cause = cause
        super().__init__(f"{len(applied)} objects were applied, then: {cause}")


@runtime_checkable
class AccessControl(Protocol):
    """Who may write what, where the backend enforces it (etcd's RBAC): an agent writes only
    what agents write, and of the per-node objects only its own node's (docs/deployment.md says
    what that leaves open). For whoever runs the datastore: the lab, or an operator."""

    def enable_access_control(self, root_password: str, admin_user: str, admin_password: str) -> None:
        """Make the roles and the admin user (every object under the prefix), then turn RBAC on;
        from then on every client needs a user. Called once, by a client without a user."""
        ...

    def add_agent_user(self, node: str, password: str) -> str:
        """The user `node`'s agent logs in as, made (or given this password) with its node's role."""
        ...

    def remove_agent_user(self, node: str) -> None:
        """The node is gone: its agent's user and role go too."""
        ...


@runtime_checkable
class AtomicWriter(Protocol):
    """Multi-object writes that happen whole or not at all, for the CLI, where a backend can."""

    def apply_many(self, objects: Sequence[Obj], admit: Admit | None = None, *, dry_run: bool = False) -> Applied:
        """Create or replace the objects, all or none; `admit` defaults and checks them against
        what it reads, and each read guards the write."""
        ...

    def delete_namespace(self, name: str) -> bool:
        """Delete the Namespace and what lives in it, all at once; False if there was none."""
        ...
