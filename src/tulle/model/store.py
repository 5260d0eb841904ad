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
from typing import Any

from tulle.datastore.base import Datastore, KeyValue
from tulle.model.kinds import KINDS, Kind, by_kind

DEFAULT_PREFIX = "/tulle"

Obj = dict[str, Any]


class Conflict(Exception):
    """The object changed since it was read."""


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

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], int]:
        prefix = f"{resources_prefix(self.prefix)}{kind.plural}/"
        if kind.namespaced and namespace:
            prefix += f"{namespace}/"
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
        """Create or replace, keeping uid and creationTimestamp; returns (object, 'created'|'configured'|'unchanged')."""
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
