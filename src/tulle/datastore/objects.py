"""What every backend does alike to objects, as pure functions: fill in what the API server
fills in, encode for storage, and plan an apply (create or replace, keeping what must stay)."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Sequence

from tulle.datastore.base import Applied, Conflict, Obj
from tulle.model.kinds import KINDS, Kind, by_kind, resource

# What deleting a Namespace takes with it: every namespaced kind, as Kubernetes' namespace
# controller deletes every object in a namespace (WorkloadEndpoints are a CRD there). A pod whose
# network is still up (its runtime has not sent CNI DEL yet) has its endpoint published again
# by its node's agent until it is torn down: the address is still in use on that node.
NAMESPACE_CASCADE: tuple[Kind, ...] = tuple(kind for kind in KINDS if kind.namespaced)


def kind_of(obj: Obj) -> Kind:
    kind = by_kind(str(obj.get("kind", "")))
    if kind is None:
        known = ", ".join(k.kind for k in KINDS)
        raise ValueError(f"kind {obj.get('kind')!r} is not one Tulle stores (known: {known})")
    return kind


def identity(obj: Obj) -> tuple[Kind, str | None, str]:
    """(kind, namespace, name); the namespace is None for cluster-scoped kinds."""
    kind = kind_of(obj)
    meta = obj["metadata"]
    return kind, (meta.get("namespace") or "default") if kind.namespaced else None, meta["name"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def complete(obj: Obj) -> Obj:
    """A copy with what the API server fills in on create: namespace, uid, creationTimestamp."""
    out = copy.deepcopy(obj)
    kind = by_kind(str(out.get("kind", "")))
    meta = out.setdefault("metadata", {})
    if kind is not None and kind.namespaced:
        meta.setdefault("namespace", "default")
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", _now())
    return out


def encode(obj: Obj) -> bytes:
    """The stored form: without resourceVersion (the store keeps that), keys sorted, compact."""
    stored = dict(obj)
    meta = dict(stored.get("metadata", {}))
    meta.pop("resourceVersion", None)
    stored["metadata"] = meta
    return json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes, resource_version: str) -> Obj:
    obj: Obj = json.loads(raw)
    obj.setdefault("metadata", {})["resourceVersion"] = resource_version
    return obj


def carry_over(desired: Obj, current: Obj) -> Obj:
    """`desired` with what an update keeps from the stored object: uid, creationTimestamp."""
    out = copy.deepcopy(desired)
    meta = out.setdefault("metadata", {})
    for field in ("uid", "creationTimestamp"):
        if field in current.get("metadata", {}):
            meta[field] = current["metadata"][field]
        else:
            meta.pop(field, None)
    return out


# One planned write of an apply: the object to store, and the resourceVersion the stored one
# must still have (None: it must not exist).
Write = tuple[Obj, str | None]
Read = Callable[[Kind, str, str | None], Obj | None]


def plan_apply(objects: Sequence[Obj], read: Read) -> tuple[Applied, list[Write]]:
    """What applying `objects` writes, from what `read` finds stored: create what is missing,
    replace what differs (keeping uid, creationTimestamp and, when the object has none, the
    stored status: status belongs to whoever reports it, as with the status subresource), and
    leave what is equal. An object that carries a resourceVersion is written only at it."""
    results: Applied = []
    writes: list[Write] = []
    seen: set[tuple[Kind, str | None, str]] = set()
    for obj in objects:
        kind, namespace, name = identity(obj)
        if (kind, namespace, name) in seen:
            where = f" in namespace {namespace}" if namespace else ""
            raise ValueError(f'{resource(kind)} "{name}"{where} is given twice')
        seen.add((kind, namespace, name))
        current = read(kind, name, namespace)
        wanted_rv = obj["metadata"].get("resourceVersion")
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
            stored = complete(fresh)
            writes.append((stored, None))
            results.append((stored, "created"))
            continue
        desired = carry_over(obj, current)
        if kind.namespaced:
            desired["metadata"]["namespace"] = namespace
        if "status" not in desired and "status" in current:
            desired["status"] = copy.deepcopy(current["status"])
        desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if encode(desired) == encode(current):
            results.append((current, "unchanged"))
            continue
        writes.append((desired, current["metadata"]["resourceVersion"]))
        results.append((desired, "configured"))
    return results, writes
