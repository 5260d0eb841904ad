"""Kubernetes-shaped resources kept in the datastore.

Layout: `<prefix>/resources/<plural>/<namespace>/<name>` (cluster-scoped kinds leave out the
namespace), the value is the object's JSON. `metadata.resourceVersion` is the key's
mod_revision, as the Kubernetes API server does with etcd, so that an update can be a
compare-and-swap on what the writer read.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from tulle.datastore.base import Datastore, DatastoreError, DeleteOp, KeyValue, PutOp, TxnOp, UnchangedOp
from tulle.model.kinds import KINDS, NAMESPACE, NETWORK_POLICY, POD, Kind, by_kind

DEFAULT_PREFIX = "/tulle"

Obj = dict[str, Any]

# What deleting a Namespace takes with it. WorkloadEndpoints stay: the agent removes them when
# the runtime tears the pod down (CNI DEL), as the kubelet does in Kubernetes.
NAMESPACE_CASCADE: tuple[Kind, ...] = (POD, NETWORK_POLICY)

_RETRIES = 10

# `ResourceStore.list` hides the builtin from mypy inside the class: name the types out here.
Applied = list[tuple[Obj, str]]
_Ops = list[TxnOp]
_Guards = list[UnchangedOp]


# Objects written per transaction when one apply holds more: etcd takes at most 128 writes and
# 128 conditions a transaction (--max-txn-ops), and each object costs a write with its own
# compare plus guards on what admission read for it (its namespace, a list of pools).
APPLY_BATCH = 40


class Conflict(Exception):
    """The object changed since it was read."""


class PartlyApplied(Exception):
    """A batched apply stopped after writing some batches: another writer changed what a later
    batch had read. `applied` holds what was written, `cause` why the rest was not."""

    def __init__(self, applied: Applied, cause: Exception) -> None:
        self.applied = applied
        self.cause = cause
        super().__init__(f"{len(applied)} objects were applied, then: {cause}")


class Reader(Protocol):
    """What admission reads: a ResourceStore, or a Snapshot that guards a transaction."""

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None: ...

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], int]: ...


Admit = Callable[[Sequence[Obj], Reader], list[Obj]]
_Objs = list[Obj]


def resource(kind: Kind) -> str:
    """kubectl's `plural.group` name of a kind, as its errors say it.

    >>> resource(NETWORK_POLICY)
    'networkpolicies.networking.k8s.io'
    """
    group = kind.api_version.rpartition("/")[0]
    return f"{kind.plural}.{group}" if group else kind.plural


def resources_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/resources/"


def object_key(prefix: str, kind: Kind, name: str, namespace: str | None = None) -> str:
    base = f"{resources_prefix(prefix)}{kind.plural}/"
    if kind.namespaced:
        return f"{base}{namespace or 'default'}/{name}"
    return f"{base}{name}"


def parse_key(prefix: str, key: str) -> tuple[Kind, str | None, str] | None:
    """(kind, namespace, name) of a resource key, or None if it is not one."""
    root = resources_prefix(prefix)
    if not key.startswith(root):
        return None
    parts = key[len(root) :].split("/")
    for kind in KINDS:
        if parts[0] != kind.plural:
            continue
        if kind.namespaced and len(parts) == 3:
            return kind, parts[1], parts[2]
        if not kind.namespaced and len(parts) == 2:
            return kind, None, parts[1]
    return None


def decode(kv: KeyValue) -> Obj:
    obj: Obj = json.loads(kv.value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
    return obj


def _encode(obj: Obj) -> bytes:
    stored = copy.deepcopy(obj)
    stored.get("metadata", {}).pop("resourceVersion", None)
    return json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ResourceStore:
    """Get, list, create, update and delete Kubernetes-shaped objects in a Datastore."""

    def __init__(self, datastore: Datastore, prefix: str = DEFAULT_PREFIX) -> None:
        self.datastore = datastore
        self.prefix = prefix

    def key(self, kind: Kind, name: str, namespace: str | None = None) -> str:
        return object_key(self.prefix, kind, name, namespace)

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        kv = self.datastore.get(self.key(kind, name, namespace))
        return decode(kv) if kv else None

    def list_prefix(self, kind: Kind, namespace: str | None = None) -> str:
        prefix = f"{resources_prefix(self.prefix)}{kind.plural}/"
        if kind.namespaced and namespace:
            prefix += f"{namespace}/"
        return prefix

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], int]:
        prefix = self.list_prefix(kind, namespace)
        kvs, revision = self.datastore.list(prefix)
        return [decode(kv) for kv in kvs if parse_key(self.prefix, kv.key) is not None], revision

    @staticmethod
    def _complete(obj: Obj) -> Obj:
        out = copy.deepcopy(obj)
        kind = by_kind(out.get("kind", ""))
        meta = out.setdefault("metadata", {})
        if kind is not None and kind.namespaced:
            meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        return out

    def create(self, obj: Obj, lease: int = 0) -> Obj | None:
        """Create the object if it does not exist; return it as stored, or None if it existed."""
        kind = by_kind(obj["kind"])
        assert kind is not None, obj["kind"]
        stored = self._complete(obj)
        key = self.key(kind, stored["metadata"]["name"], stored["metadata"].get("namespace"))
        if not self.datastore.create(key, _encode(stored), lease=lease):
            return None
        return self.get(kind, stored["metadata"]["name"], stored["metadata"].get("namespace"))

    def put(self, obj: Obj, lease: int = 0) -> int:
        """Write the object as it is, whatever is stored (one round trip); returns the revision.

        For objects one writer owns, such as a node's registration and its pods' endpoints."""
        kind = by_kind(obj["kind"])
        assert kind is not None, obj["kind"]
        meta = obj["metadata"]
        return self.datastore.put(
            self.key(kind, meta["name"], meta.get("namespace")), _encode(self._complete(obj)), lease=lease
        )

    def update(self, obj: Obj, lease: int = 0) -> Obj:
        """Replace the object; compare-and-swap on metadata.resourceVersion when it is set."""
        kind = by_kind(obj["kind"])
        assert kind is not None, obj["kind"]
        meta = obj["metadata"]
        key = self.key(kind, meta["name"], meta.get("namespace"))
        rv = meta.get("resourceVersion")
        stored = self._complete(obj)
        if rv:
            if not self.datastore.update(key, _encode(stored), int(rv), lease=lease):
                raise Conflict(f"{kind.kind} {meta['name']!r} changed since it was read")
        else:
            self.datastore.put(key, _encode(stored), lease=lease)
        out = self.get(kind, meta["name"], meta.get("namespace"))
        assert out is not None
        return out

    def apply(self, obj: Obj, lease: int = 0) -> tuple[Obj, str]:
        """Create or replace, keeping uid and creationTimestamp.

        Returns (object, 'created'|'configured'|'unchanged')."""
        kind = by_kind(obj["kind"])
        assert kind is not None, obj["kind"]
        meta = obj["metadata"]
        for _ in range(10):
            current = self.get(kind, meta["name"], meta.get("namespace"))
            if current is None:
                created = self.create(obj, lease=lease)
                if created is not None:
                    return created, "created"
                continue
            desired = copy.deepcopy(obj)
            dmeta = desired.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp"):
                if field in current["metadata"]:
                    dmeta[field] = current["metadata"][field]
            if kind.namespaced:
                dmeta.setdefault("namespace", "default")
            dmeta["resourceVersion"] = current["metadata"]["resourceVersion"]
            if _encode(desired) == _encode(current):
                return current, "unchanged"
            try:
                return self.update(desired, lease=lease), "configured"
            except Conflict:
                continue
        raise Conflict(f"{kind.kind} {meta['name']!r} keeps changing; try again")

    def delete(self, kind: Kind, name: str, namespace: str | None = None) -> bool:
        return self.datastore.delete(self.key(kind, name, namespace))

    def apply_many(
        self, objects: Sequence[Obj], admit: Admit | None = None, *, dry_run: bool = False, lease: int = 0
    ) -> Applied:
        """Create or replace the objects in one transaction: all are written or none is.

        More objects than one etcd transaction holds (APPLY_BATCH) are first admitted and
        planned whole, so that bad input still changes nothing, and then written in batches of
        APPLY_BATCH, Namespaces first, each batch atomic and admitted again against what is
        stored. Only another writer changing what a later batch reads can then stop the apply
        part way (PartlyApplied), as kubectl, which writes object by object, can stop.

        `admit` (e.g. `tulle.model.validation.admit_all`) defaults and checks the objects
        against what it reads through the Snapshot it is given; every read becomes a condition
        of the commit, so a decision made on a read (a pool does not overlap, the namespace
        exists) cannot be overtaken by another writer: the whole apply is then read, admitted
        and tried again. An object that carries metadata.resourceVersion is written only at
        that revision (Conflict otherwise). A stored `status` is kept when the object has none:
        status belongs to the component that reports it, as with Kubernetes' status subresource.
        Returns (object as stored, "created" | "configured" | "unchanged") in input order.

        >>> store.apply_many([ns_obj, policy_obj], admit=admit_all)  # doctest: +SKIP
        [({...}, 'created'), ({...}, 'configured')]
        """
        if dry_run or len(objects) <= APPLY_BATCH:
            return self._apply_atomic(objects, admit, dry_run=dry_run, lease=lease)
        self._apply_atomic(objects, admit, dry_run=True)
        # Namespaces first: a pod in a later batch is admitted against its stored namespace.
        order = sorted(range(len(objects)), key=lambda i: objects[i].get("kind") != NAMESPACE.kind)
        results: dict[int, tuple[Obj, str]] = {}
        for start in range(0, len(order), APPLY_BATCH):
            batch = order[start : start + APPLY_BATCH]
            try:
                written = self._apply_atomic([objects[i] for i in batch], admit, dry_run=False, lease=lease)
            except Exception as exc:
                if results:
                    raise PartlyApplied([results[i] for i in sorted(results)], exc) from exc
                if isinstance(exc, DatastoreError):
                    raise  # nothing was written: the datastore's own error says it all
                raise Conflict(f"what this apply read changed while it was written: {exc}") from exc
            results.update(zip(batch, written, strict=True))
        return [results[i] for i in range(len(objects))]

    def _apply_atomic(self, objects: Sequence[Obj], admit: Admit | None, *, dry_run: bool, lease: int = 0) -> Applied:
        for _ in range(_RETRIES):
            snapshot = Snapshot(self)
            admitted = admit(objects, snapshot) if admit else [copy.deepcopy(o) for o in objects]
            results, writes = self._plan(admitted, snapshot, lease)
            if dry_run:
                return results
            if not writes:
                return results
            written = {op.key for op in writes}
            revision = self.datastore.commit([*snapshot.conditions(skip=written), *writes])
            if revision is None:
                continue
            for obj, verdict in results:
                if verdict != "unchanged":
                    obj["metadata"]["resourceVersion"] = str(revision)
            return results
        raise Conflict("the objects keep changing under this apply; try again")

    def _plan(self, objects: _Objs, snapshot: Snapshot, lease: int) -> tuple[Applied, _Ops]:
        results: Applied = []
        writes: _Ops = []
        seen: set[str] = set()
        for obj in objects:
            kind = by_kind(obj.get("kind", ""))
            if kind is None:
                raise ValueError(f"kind {obj.get('kind')!r} is not one Tulle stores")
            meta = obj["metadata"]
            name, namespace = meta["name"], meta.get("namespace") if kind.namespaced else None
            key = self.key(kind, name, namespace)
            if key in seen:
                where = f" in namespace {namespace}" if namespace else ""
                raise ValueError(f'{resource(kind)} "{name}"{where} is given twice')
            seen.add(key)
            current = snapshot.get(kind, name, namespace)
            wanted_rv = meta.get("resourceVersion")
            if wanted_rv and current is None:
                raise Conflict(
                    f'{resource(kind)} "{name}" does not exist, yet metadata.resourceVersion {wanted_rv} '
                    "was given: leave resourceVersion out to create it"
                )
            if wanted_rv and current is not None and str(wanted_rv) != current["metadata"]["resourceVersion"]:
                raise Conflict(
                    f'Operation cannot be fulfilled on {resource(kind)} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again"
                )
            if current is None:
                fresh = copy.deepcopy(obj)
                for field in ("uid", "creationTimestamp", "resourceVersion"):
                    fresh["metadata"].pop(field, None)
                stored = self._complete(fresh)
                writes.append(PutOp(key, _encode(stored), expected_revision=0, lease=lease))
                results.append((stored, "created"))
                continue
            desired = copy.deepcopy(obj)
            dmeta = desired["metadata"]
            for field in ("uid", "creationTimestamp"):
                if field in current["metadata"]:
                    dmeta[field] = current["metadata"][field]
                else:
                    dmeta.pop(field, None)
            if "status" not in desired and "status" in current:
                desired["status"] = copy.deepcopy(current["status"])
            dmeta["resourceVersion"] = current["metadata"]["resourceVersion"]
            if _encode(desired) == _encode(current):
                results.append((current, "unchanged"))
                continue
            expected = int(current["metadata"]["resourceVersion"])
            writes.append(PutOp(key, _encode(desired), expected_revision=expected, lease=lease))
            results.append((desired, "configured"))
        return results, writes

    def delete_namespace(self, name: str) -> bool:
        """Delete the Namespace and, in the same transaction, every Pod and NetworkPolicy in it.

        Kubernetes' namespace controller does this in the background; at once is simpler and
        leaves no window in which the objects outlive their namespace. Admission guards the
        other side: an apply into a namespace is conditional on the namespace's revision.
        False if there was no such Namespace.
        """
        key = self.key(NAMESPACE, name)
        for _ in range(_RETRIES):
            kv = self.datastore.get(key)
            if kv is None:
                return False
            ops: _Ops = [DeleteOp(key, expected_revision=kv.mod_revision)]
            ops += [DeleteOp(self.list_prefix(kind, name), prefix=True) for kind in NAMESPACE_CASCADE]
            if self.datastore.commit(ops) is not None:
                return True
        raise Conflict(f'namespaces "{name}" keeps changing; try again')


class Snapshot:
    """Reads made for one transaction; `conditions()` turns each into a guard of its commit.

    A key read is guarded on the revision it was read at (0: it did not exist); a list on
    "no key under the prefix created or changed since", which catches every addition (what
    an overlap check must not miss) though not deletions.
    """

    def __init__(self, store: ResourceStore) -> None:
        self.store = store
        self._keys: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        key = self.store.key(kind, name, namespace)
        kv = self.store.datastore.get(key)
        self._keys.setdefault(key, kv.mod_revision if kv else 0)
        return decode(kv) if kv else None

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[_Objs, int]:
        objects, revision = self.store.list(kind, namespace)
        self._prefixes.setdefault(self.store.list_prefix(kind, namespace), revision)
        return objects, revision

    def conditions(self, skip: Collection[str] = ()) -> _Guards:
        """The guards, leaving out keys in `skip` (the writes compare those themselves)."""
        ops = [UnchangedOp(key, rev) for key, rev in self._keys.items() if key not in skip]
        ops += [UnchangedOp(prefix, rev, prefix=True) for prefix, rev in self._prefixes.items()]
        return ops
