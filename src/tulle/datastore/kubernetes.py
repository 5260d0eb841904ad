"""The Kubernetes API as datastore (Calico's Kubernetes datastore mode): Namespaces, Pods, Nodes
and NetworkPolicies are the API server's own; Tulle's kinds (IPPool, IPAMBlock, WorkloadEndpoint)
are CustomResourceDefinitions (datastore/crds/*.yaml, `install_crds`), whose structural schemas
make the API server refuse malformed objects. Keys, revisions and leases of etcd do not exist
here; the API server's resourceVersion is the version every object carries.

- `update` and `delete` given a resourceVersion are the API server's own compare-and-swap (PUT
  with metadata.resourceVersion; DELETE with preconditions): 409 is Conflict.
- `watch` is one HTTP watch stream per kind, from a resourceVersion, with bookmarks; a stream the
  server ends, or a connection that drops, is opened again from the last version seen (an event
  or a bookmark), after a backoff with jitter while the server is away, so that nothing is
  missed; 410 Gone (the version is too old) ends the watch with WatchExpired: list again.
- liveness is a coordination.k8s.io Lease per node in the namespace `tulle-system`, as kubelets
  keep theirs in kube-node-lease: renewTime + leaseDurationSeconds is when it expires.
- `apply_many` admits the whole input first (bad input writes nothing), then writes object by
  object, each a compare-and-swap on what admission read, as kubectl does: the API server has no
  multi-object transactions (docs/design/datastore.md).
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

from tulle.datastore.base import (
    Admit,
    AlreadyExists,
    Applied,
    Conflict,
    CredentialsError,
    DatastoreError,
    NodeLiveness,
    NotFound,
    Obj,
    Reachability,
    ReachabilityTracker,
    WatchEvent,
    WatchExpired,
)
from tulle.datastore.kube_client import ApiStatus, KubeClient
from tulle.datastore.objects import NAMESPACE_CASCADE, identity, plan_apply
from tulle.model.kinds import NAMESPACE, Kind

LEASE_NAMESPACE = "tulle-system"
_LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
WATCH_SECONDS = 300  # the server ends each watch stream after this; it is opened again from where it was
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


class RefusedByApiServer(ValueError):
    """The API server refused the object (its schema or its validation): the message says why."""


def collection_path(kind: Kind, namespace: str | None = None) -> str:
    """The REST path of a kind's objects (in one namespace, if given and the kind has them).

    >>> collection_path(NAMESPACE)
    '/api/v1/namespaces'
    >>> from tulle.model.kinds import IPAM_BLOCK, WORKLOAD_ENDPOINT
    >>> collection_path(WORKLOAD_ENDPOINT, "web")
    '/apis/tulle.dev/v1/namespaces/web/workloadendpoints'
    """
    root = "/api/v1" if kind.api_version == "v1" else f"/apis/{kind.api_version}"
    where = f"/namespaces/{quote(namespace)}" if kind.namespaced and namespace else ""
    return f"{root}{where}/{kind.plural}"


def object_path(kind: Kind, name: str, namespace: str | None) -> str:
    return f"{collection_path(kind, (namespace or 'default') if kind.namespaced else None)}/{quote(name)}"


def _tidy(obj: Obj, kind: Kind) -> Obj:
    """The object as Tulle holds it: with its kind, without managedFields (server-side apply's
    bookkeeping, which Tulle never reads and which would double an agent's memory)."""
    obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
    obj.get("metadata", {}).pop("managedFields", None)
    return obj


def _micro_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1e6) % 1_000_000:06d}Z"


def _parse_micro_time(text: str) -> float:
    import calendar

    seconds, _, fraction = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(seconds, "%Y-%m-%dT%H:%M:%S")) + (float(f"0.{fraction}") if fraction else 0.0)


class KubernetesWatch:
    """One watch stream of a kind, read by a thread into a queue; resumed from the last version
    seen when the stream ends or the connection drops (backoff with jitter while it cannot)."""

    def __init__(self, store: KubernetesDatastore, kind: Kind, resource_version: str) -> None:
        self.store = store
        self.kind = kind
        self.position = resource_version
        self.events: queue.Queue[WatchEvent | Exception] = queue.Queue()
        self.cancelled = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind.plural}", daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> WatchEvent | None:
        if self.cancelled.is_set():
            raise DatastoreError("watch cancelled")
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            self.events.put(item)  # the watch stays ended
            raise item
        return item

    def cut(self) -> None:
        """Drop the stream's connection (as a network fault does): it is opened again from the
        last version seen."""
        with self._lock:
            if self._conn is not None and self._conn.sock is not None:
                with contextlib.suppress(OSError):
                    self._conn.sock.shutdown(2)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            if self._conn is not None and self._conn.sock is not None:
                with contextlib.suppress(OSError):
                    self._conn.sock.shutdown(2)

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self.cancelled.is_set():
            try:
                ended = self._stream()
                backoff = BACKOFF_FIRST
                if ended:
                    return
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.cancelled.is_set():
                    return
                self.store.tracker.failed(f"Kubernetes API {self.store.url}: watch of {self.kind.plural}: {exc}")
                # jitter: agents cut off together must not come back together
                self.cancelled.wait(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _stream(self) -> bool:
        """Read one stream to its end; True when the watch is over (expired or refused)."""
        query = urlencode(
            {
                "watch": "1",
                "allowWatchBookmarks": "true",
                "resourceVersion": self.position,
                "timeoutSeconds": str(WATCH_SECONDS),
            }
        )
        client = self.store.client
        conn = client.connect(timeout=WATCH_SECONDS + 30)
        with self._lock:
            self._conn = conn
        try:
            headers = {"Accept": "application/json"}
            if client.credentials.token:
                headers["Authorization"] = f"Bearer {client.credentials.token}"
            conn.request("GET", f"{collection_path(self.kind)}?{query}", headers=headers)
            response = conn.getresponse()
            self.store.tracker.succeeded()
            if response.status == 410:
                self.events.put(WatchExpired(f"resourceVersion {self.position} is too old"))
                return True
            if response.status >= 400:
                self.events.put(DatastoreError(f"watch of {self.kind.plural} refused: HTTP {response.status}"))
                return True
            while not self.cancelled.is_set():
                line = response.readline()
                if not line:
                    return False  # the server ended the stream: watch again from self.position
                event = json.loads(line)
                obj = event.get("object") or {}
                kind = event.get("type")
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        self.events.put(WatchExpired(str(obj.get("message", "too old resource version"))))
                    else:
                        self.events.put(DatastoreError(f"watch of {self.kind.plural}: {obj.get('message')}"))
                    return True
                self.position = str(obj.get("metadata", {}).get("resourceVersion", self.position))
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.events.put(WatchEvent(kind, _tidy(obj, self.kind)))
            return True
        finally:
            with self._lock:
                self._conn = None
            conn.close()


class KubernetesHeartbeat:
    """A node's agent liveness as a Lease: holderIdentity names this agent's run, renewTime and
    leaseDurationSeconds say until when it is alive; the agent's start time and PID are in
    annotations, for `tulle status`."""

    def __init__(self, store: KubernetesDatastore, node: str, ttl: int) -> None:
        self.store, self.node, self.ttl = store, node, ttl
        self.holder = f"{node}-{uuid.uuid4().hex[:12]}"
        self.started = time.time()

    def _lease(self, resource_version: str | None) -> Obj:
        now = _micro_time(time.time())
        meta: Obj = {
            "name": self.node,
            "namespace": LEASE_NAMESPACE,
            "annotations": {"tulle.dev/agent-started": str(self.started), "tulle.dev/agent-pid": str(os.getpid())},
        }
        if resource_version:
            meta["resourceVersion"] = resource_version
        spec = {"holderIdentity": self.holder, "leaseDurationSeconds": self.ttl, "acquireTime": now, "renewTime": now}
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def start(self) -> None:
        current = self.store.call("GET", f"{_LEASES}/{quote(self.node)}", missing_ok=True)
        if current is None:
            try:
                self.store.call("POST", _LEASES, self._lease(None))
            except NotFound:  # the namespace is not there yet
                self.store.ensure_namespace(LEASE_NAMESPACE)
                self.store.call("POST", _LEASES, self._lease(None))
            return
        self.store.call("PUT", f"{_LEASES}/{quote(self.node)}", self._lease(current["metadata"]["resourceVersion"]))

    def renew(self) -> bool:
        current = self.store.call("GET", f"{_LEASES}/{quote(self.node)}", missing_ok=True)
        if current is not None and current["spec"].get("holderIdentity") == self.holder and _alive(current):
            lease = self._lease(current["metadata"]["resourceVersion"])
            lease["spec"]["acquireTime"] = current["spec"].get("acquireTime", lease["spec"]["acquireTime"])
            try:
                self.store.call("PUT", f"{_LEASES}/{quote(self.node)}", lease)
                return False
            except Conflict:
                pass
        self.start()
        return True


def _alive(lease: Obj, now: float | None = None) -> bool:
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    if not renewed:
        return False
    return _parse_micro_time(str(renewed)) + int(spec.get("leaseDurationSeconds") or 0) > (now or time.time())


class KubernetesDatastore:
    """The Datastore interface (and AtomicWriter) on a Kubernetes API server."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.tracker = ReachabilityTracker()
        self.url = client.credentials.server

    def call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Obj | None:
        """One request, its outcome recorded; API errors as the interface's exceptions."""
        try:
            answer = self.client.request(method, path, body)
        except CredentialsError as exc:
            self.tracker.failed(str(exc))
            raise
        except DatastoreError as exc:
            self.tracker.failed(str(exc))
            raise
        except ApiStatus as exc:
            self.tracker.succeeded()
            if exc.code == 404:
                if missing_ok:
                    return None
                raise NotFound(str(exc)) from None
            if exc.code == 409:
                raise (AlreadyExists if exc.reason == "AlreadyExists" else Conflict)(str(exc)) from None
            if exc.code == 403:
                raise CredentialsError(f"the Kubernetes API {self.url} refused: {exc}") from None
            if exc.code in (400, 422):
                raise RefusedByApiServer(str(exc)) from None
            raise DatastoreError(f"Kubernetes API {self.url}: HTTP {exc.code}: {exc}") from None
        self.tracker.succeeded()
        return answer

    def ensure_namespace(self, name: str) -> None:
        with contextlib.suppress(AlreadyExists):
            self.call(
                "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        found = self.call("GET", object_path(kind, name, namespace), missing_ok=True)
        return _tidy(found, kind) if found is not None else None

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        answer = self.call("GET", collection_path(kind, namespace)) or {}
        items = [_tidy(item, kind) for item in answer.get("items") or []]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items, str(answer.get("metadata", {}).get("resourceVersion", ""))

    def watch(self, kind: Kind, resource_version: str) -> KubernetesWatch:
        return KubernetesWatch(self, kind, resource_version)

    def create(self, obj: Obj) -> Obj:
        kind, namespace, _ = identity(obj)
        body = copy.deepcopy(obj)
        for field in ("resourceVersion", "uid", "creationTimestamp"):
            body["metadata"].pop(field, None)
        if kind.namespaced:
            body["metadata"]["namespace"] = namespace
        made = self.call("POST", collection_path(kind, namespace), body)
        assert made is not None
        return _tidy(made, kind)

    def update(self, obj: Obj) -> Obj:
        kind, namespace, name = identity(obj)
        body = copy.deepcopy(obj)
        if kind.namespaced:
            body["metadata"]["namespace"] = namespace
        if not body["metadata"].get("resourceVersion"):
            # unconditional: the API server's PUT without a version replaces whatever is there
            body["metadata"].pop("resourceVersion", None)
            body["metadata"].pop("uid", None)
        stored = self.call("PUT", object_path(kind, name, namespace), body)
        assert stored is not None
        return _tidy(stored, kind)

    def delete(self, kind: Kind, name: str, namespace: str | None = None, resource_version: str | None = None) -> bool:
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if resource_version:
            body["preconditions"] = {"resourceVersion": str(resource_version)}
        try:
            gone = self.call("DELETE", object_path(kind, name, namespace), body, missing_ok=True)
        except NotFound:
            return False
        return gone is not None

    def heartbeat(self, node: str, ttl: int) -> KubernetesHeartbeat:
        return KubernetesHeartbeat(self, node, ttl)

    def live_nodes(self) -> dict[str, NodeLiveness]:
        answer = self.call("GET", _LEASES) or {}
        now = time.time()
        live: dict[str, NodeLiveness] = {}
        for lease in answer.get("items") or []:
            if not _alive(lease, now):
                continue
            notes = lease["metadata"].get("annotations") or {}
            name = lease["metadata"]["name"]
            live[name] = NodeLiveness(
                name, float(notes.get("tulle.dev/agent-started", 0)), int(notes.get("tulle.dev/agent-pid", 0))
            )
        return live

    @property
    def reachability(self) -> Reachability:
        return self.tracker.state

    def close(self) -> None:
        self.client.close()

    # -- AtomicWriter, as far as the API server allows ----------------------------------------

    def apply_many(self, objects: Sequence[Obj], admit: Admit | None = None, *, dry_run: bool = False) -> Applied:
        admitted = admit(objects, _UpdatesJudgedByApiServer(self)) if admit else [copy.deepcopy(o) for o in objects]
        results, writes = plan_apply(admitted, self.get)
        if dry_run:
            return results
        written: dict[int, tuple[Obj, str | None]] = {}  # id of a planned object: (as stored, version before)
        for obj, expected in writes:
            stored = self.create(obj) if expected is None else self.update(obj)
            written[id(obj)] = (stored, expected)
        applied: Applied = []
        for obj, verdict in results:
            stored, before = written.get(id(obj), (obj, None))
            # the API server fills in defaults the input lacks, so the plan may see a change
            # where there is none; a write that changed nothing keeps the version: "unchanged"
            if verdict == "configured" and stored["metadata"]["resourceVersion"] == before:
                verdict = "unchanged"
            applied.append((stored, verdict))
        return applied

    def delete_namespace(self, name: str) -> bool:
        """Delete what Tulle stores in the namespace, then the namespace (the namespace
        controller finishes it); False if there was none, or it is already going."""
        found = self.get(NAMESPACE, name)
        if found is None or found["metadata"].get("deletionTimestamp"):
            return False
        for kind in NAMESPACE_CASCADE:
            for obj in self.list(kind, name)[0]:
                self.delete(kind, obj["metadata"]["name"], name)
        self.delete(NAMESPACE, name)
        return True


class _UpdatesJudgedByApiServer:
    """What Tulle's admission reads when the API server stores the objects: the same, except
    the stored Pods. Which changes of a Pod are allowed is the API server's own rule (it compares
    with the Pod as it stored it, defaults included); Tulle's copy of that rule would refuse
    every re-apply, since the input lacks the defaults."""

    def __init__(self, store: KubernetesDatastore) -> None:
        self.store = store

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        return None if kind.kind == "Pod" else self.store.get(kind, name, namespace)

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        return self.store.list(kind, namespace)


def crd_documents() -> list[Obj]:
    """Tulle's CustomResourceDefinitions, as shipped in tulle/datastore/crds/."""
    import yaml

    folder = resources.files("tulle.datastore") / "crds"
    return [yaml.safe_load(entry.read_text()) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")]  # fmt: skip


def install_crds(store: KubernetesDatastore, timeout: float = 30.0) -> None:
    """Create or replace Tulle's CRDs and the namespace of its leases, then wait until the API
    server serves every CRD (Established), so that the caller's next write of one is not a 404."""
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names = []
    for crd in crd_documents():
        name = crd["metadata"]["name"]
        names.append(name)
        current = store.call("GET", f"{base}/{name}", missing_ok=True)
        if current is None:
            store.call("POST", base, crd)
        else:
            crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            store.call("PUT", f"{base}/{name}", crd)
    store.ensure_namespace(LEASE_NAMESPACE)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = store.call("GET", f"{base}/{name}") or {}
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise DatastoreError(f"CRD {name} was not established within {timeout:.0f} s")
            time.sleep(0.1)
