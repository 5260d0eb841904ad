"""The etcd backend: resources as JSON values in etcd v3, as the Kubernetes API server keeps them.

Layout: `<prefix>/resources/<plural>/[<namespace>/]<name>`; `metadata.resourceVersion` is the
key's mod_revision (a list's version is the store revision it read at), so an update given a
resourceVersion is a compare-and-swap on it. A node's heartbeat is `<prefix>/heartbeats/<node>`
under an etcd lease: keepalives change no key (no watch event), and the key vanishes when the
agent has been silent for the lease's TTL. Multi-object writes are etcd transactions, each
guarded by what admission read for it.

Access (etcd's RBAC, when it is on): the role `tulle-agent` reads everything under the prefix
and writes only the kinds agents write (WorkloadEndpoints, IPAMBlocks); each node's role
`tulle-node.<node>` adds its own Node object and heartbeat; `tulle-admin` writes everything
under the prefix (the CLI). Pods, Namespaces, NetworkPolicies and IPPools are then beyond an
agent's reach.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence

from tulle.datastore.base import (
    Admit,
    AlreadyExists,
    Applied,
    Conflict,
    DatastoreError,
    NodeLiveness,
    NotFound,
    Obj,
    PartlyApplied,
    Reachability,
    WatchEvent,
)
from tulle.datastore.etcd_client import (
    MAX_TXN_OPS,
    DeleteOp,
    EtcdClient,
    EtcdWatch,
    Grant,
    KeyValue,
    PutOp,
    TxnOp,
    UnchangedOp,
)
from tulle.datastore.objects import NAMESPACE_CASCADE, carry_over, complete, decode, encode, identity, plan_apply
from tulle.model.kinds import IPAM_BLOCK, NAMESPACE, NODE, POD, WORKLOAD_ENDPOINT, Kind

log = logging.getLogger(__name__)

_RETRIES = 10
AGENT_ROLE = "tulle-agent"
ADMIN_ROLE = "tulle-admin"
# Objects written per transaction when one apply holds more: etcd takes at most 128 writes and
# 128 conditions a transaction (--max-txn-ops), and each object costs a write with its own
# compare plus guards on what admission read for it (its namespace, a list of pools).
APPLY_BATCH = 40
assert 3 * APPLY_BATCH <= MAX_TXN_OPS


class EtcdResourceWatch:
    """A kind's changes as WatchEvents, from the key watch under the kind's prefix."""

    def __init__(self, keys: EtcdWatch, store: EtcdDatastore, kind: Kind) -> None:
        self._keys = keys
        self._store = store
        self._kind = kind

    def get(self, timeout: float) -> WatchEvent | None:
        event = self._keys.get(timeout)
        if event is None:
            return None
        version = str(event.mod_revision)
        if event.kind == "delete":
            obj = decode(event.value, version) if event.value else self._store.stub(self._kind, event.key, version)
            return WatchEvent("DELETED", obj)
        kind = "ADDED" if event.create_revision == event.mod_revision else "MODIFIED"
        return WatchEvent(kind, decode(event.value, version))

    def cancel(self) -> None:
        self._keys.cancel()


class EtcdHeartbeat:
    """A heartbeat key under a lease of `ttl` seconds."""

    def __init__(self, client: EtcdClient, key: str, node: str, ttl: int) -> None:
        self.client = client
        self.key = key
        self.node = node
        self.ttl = ttl
        self.lease = 0
        self._started = time.time()

    def _beat(self) -> None:
        self.lease = self.client.grant_lease(self.ttl)
        body = {"node": self.node, "started": self._started, "pid": os.getpid()}
        self.client.put(self.key, json.dumps(body, sort_keys=True).encode(), lease=self.lease)

    def start(self) -> None:
        """Beat under a new lease and end the lease an earlier agent of this node left behind:
        put first, then revoke, so the key never disappears in between."""
        before = self.client.get(self.key)
        self._beat()
        if before is not None and before.lease and before.lease != self.lease:
            self.client.revoke_lease(before.lease)
            log.info("revoked the heartbeat lease of an earlier agent", extra={"lease": before.lease})

    def renew(self) -> bool:
        if self.client.keepalive(self.lease) > 0:
            return False
        self._beat()
        log.info("the heartbeat's lease had expired; beating under a new one", extra={"lease": self.lease})
        return True


_Ops = list[TxnOp]  # GuardedReader's `list` method hides the builtin from mypy inside the class
_Grants = list[Grant]  # and EtcdDatastore's


class GuardedReader:
    """Reads made for one transaction; `conditions()` turns each into a guard of its commit.

    A key read is guarded on the revision it was read at (0: it did not exist); a list on "no
    key under the prefix created or changed since", which catches every addition (what an
    overlap check must not miss) though not deletions.
    """

    def __init__(self, store: EtcdDatastore) -> None:
        self.store = store
        self._keys: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        key = self.store.key(kind, name, namespace)
        kv = self.store.client.get(key)
        self._keys.setdefault(key, kv.mod_revision if kv else 0)
        return decode(kv.value, str(kv.mod_revision)) if kv else None

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        objects, version = self.store.list(kind, namespace)
        self._prefixes.setdefault(self.store.list_prefix(kind, namespace), int(version))
        return objects, version

    def conditions(self, skip: set[str]) -> _Ops:
        """The guards, leaving out keys in `skip` (the writes compare those themselves)."""
        ops: _Ops = [UnchangedOp(key, rev) for key, rev in self._keys.items() if key not in skip]
        ops += [UnchangedOp(prefix, rev, prefix=True) for prefix, rev in self._prefixes.items()]
        return ops


class EtcdDatastore:
    """The Datastore interface on etcd. `client` speaks to one etcd; `prefix` keeps clusters
    (or tests) that share it apart."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    @property
    def url(self) -> str:
        return self.client.endpoint

    # -- keys -----------------------------------------------------------------------------

    def _kind_prefix(self, kind: Kind) -> str:
        return f"{self.prefix}/resources/{kind.plural}/"

    def key(self, kind: Kind, name: str, namespace: str | None = None) -> str:
        if kind.namespaced:
            return f"{self._kind_prefix(kind)}{namespace or 'default'}/{name}"
        return f"{self._kind_prefix(kind)}{name}"

    def list_prefix(self, kind: Kind, namespace: str | None = None) -> str:
        prefix = self._kind_prefix(kind)
        return f"{prefix}{namespace}/" if kind.namespaced and namespace else prefix

    def _is_object_key(self, kind: Kind, key: str) -> bool:
        parts = key[len(self._kind_prefix(kind)) :].split("/")
        return len(parts) == (2 if kind.namespaced else 1) and all(parts)

    def stub(self, kind: Kind, key: str, version: str) -> Obj:
        """The identity of a deleted object whose last value etcd no longer has."""
        parts = key[len(self._kind_prefix(kind)) :].split("/")
        meta: Obj = {"name": parts[-1], "resourceVersion": version}
        if kind.namespaced:
            meta["namespace"] = parts[0]
        return {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}

    def _heartbeat_key(self, node: str) -> str:
        return f"{self.prefix}/heartbeats/{node}"

    # -- the interface ------------------------------------------------------------------------

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        kv = self.client.get(self.key(kind, name, namespace))
        return decode(kv.value, str(kv.mod_revision)) if kv else None

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        kvs, revision = self.client.list(self.list_prefix(kind, namespace))
        objects = [decode(kv.value, str(kv.mod_revision)) for kv in kvs if self._is_object_key(kind, kv.key)]
        return objects, str(revision)

    def watch(self, kind: Kind, resource_version: str) -> EtcdResourceWatch:
        keys = self.client.watch(self._kind_prefix(kind), int(resource_version or 0) + 1)
        return EtcdResourceWatch(keys, self, kind)

    def create(self, obj: Obj) -> Obj:
        stored = complete(obj)
        stored["metadata"].pop("resourceVersion", None)
        kind, namespace, name = identity(stored)
        revision = self.client.create(self.key(kind, name, namespace), encode(stored))
        if revision is None:
            raise AlreadyExists(f'{kind.kind} "{name}" already exists')
        stored["metadata"]["resourceVersion"] = str(revision)
        return stored

    def update(self, obj: Obj) -> Obj:
        kind, namespace, name = identity(obj)
        key = self.key(kind, name, namespace)
        meta = obj["metadata"]
        wanted = meta.get("resourceVersion")
        if wanted and "uid" in meta and "creationTimestamp" in meta:
            # An object as read, changed: one compare-and-swap (the hot path of IPAM).
            stored = copy.deepcopy(obj)
            if kind.namespaced:
                stored["metadata"]["namespace"] = namespace
            revision = self.client.update(key, encode(stored), int(wanted))
            if revision is not None:
                stored["metadata"]["resourceVersion"] = str(revision)
                return stored
            if self.client.get(key) is None:
                raise NotFound(f'{kind.kind} "{name}" does not exist')
            raise Conflict(f'{kind.kind} "{name}" changed since it was read')
        for _attempt in range(_RETRIES):
            current = self.client.get(key)
            if current is None:
                raise NotFound(f'{kind.kind} "{name}" does not exist')
            if wanted and str(current.mod_revision) != str(wanted):
                raise Conflict(f'{kind.kind} "{name}" changed since it was read')
            stored = carry_over(obj, decode(current.value, str(current.mod_revision)))
            if kind.namespaced:
                stored["metadata"]["namespace"] = namespace
            revision = self.client.update(key, encode(stored), current.mod_revision)
            if revision is not None:
                stored["metadata"]["resourceVersion"] = str(revision)
                return stored
            if wanted:
                raise Conflict(f'{kind.kind} "{name}" changed since it was read')
        raise Conflict(f'{kind.kind} "{name}" keeps changing')

    def delete(self, kind: Kind, name: str, namespace: str | None = None, resource_version: str | None = None) -> bool:
        key = self.key(kind, name, namespace)
        if not resource_version:
            return self.client.delete(key)
        if self.client.delete(key, expected_revision=int(resource_version)):
            return True
        if self.client.get(key) is None:
            return False
        raise Conflict(f'{kind.kind} "{name}" changed since it was read')

    def heartbeat(self, node: str, ttl: int) -> EtcdHeartbeat:
        return EtcdHeartbeat(self.client, self._heartbeat_key(node), node, ttl)

    def live_nodes(self) -> dict[str, NodeLiveness]:
        kvs, _ = self.client.list(self._heartbeat_key(""))
        out = {}
        for kv in kvs:
            try:
                body = json.loads(kv.value)
                beat = NodeLiveness(node=str(body["node"]), started=float(body["started"]), pid=int(body["pid"]))
            except (ValueError, KeyError, TypeError):
                continue
            out[beat.node] = beat
        return out

    # -- access (AccessControl) -----------------------------------------------------------------

    def agent_grants(self) -> _Grants:
        """What every agent may do: read the cluster, write the kinds agents write, and delete the
        Pods of a removed node (etcd cannot grant a delete alone: write is the least that does)."""
        return [
            Grant("READ", f"{self.prefix}/", prefix=True),
            Grant("READWRITE", self._kind_prefix(WORKLOAD_ENDPOINT), prefix=True),
            Grant("READWRITE", self._kind_prefix(IPAM_BLOCK), prefix=True),
            Grant("WRITE", self._kind_prefix(POD), prefix=True),
        ]

    def node_grants(self, node: str) -> _Grants:
        """What only `node`'s agent may write: its registration and its heartbeat (and so revoke
        the heartbeat's lease, which etcd allows to whoever may write the keys under it)."""
        return [Grant("READWRITE", self.key(NODE, node)), Grant("READWRITE", self._heartbeat_key(node))]

    def enable_access_control(self, root_password: str, admin_user: str, admin_password: str) -> None:
        self.client.add_user("root", root_password)
        self.client.grant_role("root", "root")
        self.client.add_role(ADMIN_ROLE, [Grant("READWRITE", f"{self.prefix}/", prefix=True)])
        self.client.add_user(admin_user, admin_password)
        self.client.grant_role(admin_user, ADMIN_ROLE)
        self.client.add_role(AGENT_ROLE, self.agent_grants())
        self.client.enable_auth()

    @staticmethod
    def agent_user(node: str) -> str:
        return f"{AGENT_ROLE}.{node}"

    @staticmethod
    def node_role(node: str) -> str:
        return f"tulle-node.{node}"

    def add_agent_user(self, node: str, password: str) -> str:
        user = self.agent_user(node)
        self.client.add_role(self.node_role(node), self.node_grants(node))
        self.client.add_user(user, password)
        self.client.grant_role(user, AGENT_ROLE)
        self.client.grant_role(user, self.node_role(node))
        return user

    def remove_agent_user(self, node: str) -> None:
        self.client.delete_user(self.agent_user(node))
        self.client.delete_role(self.node_role(node))

    def heartbeat_lease(self, node: str) -> int:
        """The etcd lease of a node's heartbeat (0 if it has none): for tests of the lease."""
        kv: KeyValue | None = self.client.get(self._heartbeat_key(node))
        return kv.lease if kv else 0

    @property
    def reachability(self) -> Reachability:
        return self.client.reachability

    def close(self) -> None:
        self.client.close()

    # -- multi-object writes (AtomicWriter) ----------------------------------------------------

    def apply_many(self, objects: Sequence[Obj], admit: Admit | None = None, *, dry_run: bool = False) -> Applied:
        """Create or replace the objects in one transaction: all are written or none is.

        More objects than one etcd transaction holds (APPLY_BATCH) are first admitted and
        planned whole, so that bad input still changes nothing, and then written in batches of
        APPLY_BATCH, Namespaces first, each batch atomic and admitted again against what is
        stored. Only another writer changing what a later batch reads can then stop the apply
        part way (PartlyApplied), as kubectl, which writes object by object, can stop.

        `admit` (e.g. `tulle.model.validation.admit_all`) defaults and checks the objects
        against what it reads through the GuardedReader it is given; every read becomes a
        condition of the commit, so a decision made on a read (a pool does not overlap, the
        namespace exists) cannot be overtaken by another writer: the whole apply is then read,
        admitted and tried again. Returns (object as stored, "created" | "configured" |
        "unchanged") in input order.

        >>> store.apply_many([ns_obj, policy_obj], admit=admit_all)  # doctest: +SKIP
        [({...}, 'created'), ({...}, 'configured')]
        """
        if dry_run or len(objects) <= APPLY_BATCH:
            return self._apply_atomic(objects, admit, dry_run=dry_run)
        self._apply_atomic(objects, admit, dry_run=True)
        # Namespaces first: a pod in a later batch is admitted against its stored namespace.
        order = sorted(range(len(objects)), key=lambda i: objects[i].get("kind") != NAMESPACE.kind)
        results: dict[int, tuple[Obj, str]] = {}
        for start in range(0, len(order), APPLY_BATCH):
            batch = order[start : start + APPLY_BATCH]
            try:
                written = self._apply_atomic([objects[i] for i in batch], admit, dry_run=False)
            except Exception as exc:
                if results:
                    raise PartlyApplied([results[i] for i in sorted(results)], exc) from exc
                if isinstance(exc, DatastoreError):
                    raise  # nothing was written: the datastore's own error says it all
                raise Conflict(f"what this apply read changed while it was written: {exc}") from exc
            results.update(zip(batch, written, strict=True))
        return [results[i] for i in range(len(objects))]

    def _apply_atomic(self, objects: Sequence[Obj], admit: Admit | None, *, dry_run: bool) -> Applied:
        for _ in range(_RETRIES):
            reader = GuardedReader(self)
            admitted = admit(objects, reader) if admit else [dict(o) for o in objects]
            results, writes = plan_apply(admitted, reader.get)
            if dry_run or not writes:
                return results
            ops: list[TxnOp] = []
            for obj, expected in writes:
                kind, namespace, name = identity(obj)
                ops.append(PutOp(self.key(kind, name, namespace), encode(obj), int(expected or 0)))
            revision = self.client.commit([*reader.conditions(skip={op.key for op in ops}), *ops])
            if revision is None:
                continue
            for obj, verdict in results:
                if verdict != "unchanged":
                    obj["metadata"]["resourceVersion"] = str(revision)
            return results
        raise Conflict("the objects keep changing under this apply; try again")

    def delete_namespace(self, name: str) -> bool:
        """Delete the Namespace and, in the same transaction, every Pod, NetworkPolicy and
        WorkloadEndpoint in it.

        Kubernetes' namespace controller does this in the background; at once is simpler and
        leaves no window in which the objects outlive their namespace. Admission guards the
        other side: an apply into a namespace is conditional on the namespace's revision."""
        key = self.key(NAMESPACE, name)
        for _ in range(_RETRIES):
            kv = self.client.get(key)
            if kv is None:
                return False
            ops: list[TxnOp] = [DeleteOp(key, expected_revision=kv.mod_revision)]
            ops += [DeleteOp(self.list_prefix(kind, name), prefix=True) for kind in NAMESPACE_CASCADE]
            if self.client.commit(ops) is not None:
                return True
        raise Conflict(f'namespaces "{name}" keeps changing; try again')
