"""The agent's view of the cluster: every key under the prefix, kept current by list + watch.

One watch on the whole prefix (a few thousand small keys even in a large cluster): the cache
lists once, then applies the watch's changes from the listed revision on, so no change is
missed. If the watch breaks or its revision was compacted, it lists again. Readers get
immutable snapshots; a change wakes whoever waits for one.

Heartbeats are left out: an agent's liveness is reported, never acted on, so another node's
heartbeat coming and going must not cost this agent a pass. WorkloadEndpoints are also indexed
by address, so an ADD can check in O(1) that nobody holds the address IPAM gave it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tulle.agent.endpoints import handle_for
from tulle.datastore.base import DatastoreError
from tulle.datastore.etcd import EtcdDatastore
from tulle.datastore.heartbeat import heartbeats_prefix
from tulle.ipam.allocator import blocks_prefix
from tulle.model.kinds import WORKLOAD_ENDPOINT, Kind
from tulle.model.store import resources_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    revision: int
    values: dict[str, tuple[bytes, int]]  # key -> (value, mod_revision)

    def objects(self, prefix: str, kind: Kind) -> list[dict[str, Any]]:
        root = f"{resources_prefix(prefix)}{kind.plural}/"
        out = []
        for key, (value, rev) in self.values.items():
            if key.startswith(root):
                try:
                    obj = json.loads(value)
                except ValueError:
                    continue
                obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
                out.append(obj)
        return out

    def blocks(self, prefix: str) -> list[dict[str, Any]]:
        root = blocks_prefix(prefix)
        out = []
        for key, (value, _) in self.values.items():
            if key.startswith(root):
                try:
                    out.append(json.loads(value))
                except ValueError:
                    continue
        return out


@dataclass(frozen=True)
class AddressHolder:
    namespace: str
    name: str  # the WorkloadEndpoint's
    node: str
    pod: str
    handle: str  # the IPAM handle: network/containerID/ifname

    @property
    def description(self) -> str:
        return f"pod {self.namespace}/{self.pod} on node {self.node}"


def _holder(value: bytes) -> tuple[AddressHolder, list[str]] | None:
    """Who a WorkloadEndpoint says holds which addresses."""
    try:
        obj = json.loads(value)
        meta, spec = obj["metadata"], obj["spec"]
        handle = handle_for(str(spec["network"]), str(spec["containerID"]), str(spec["ifname"]))
        holder = AddressHolder(
            str(meta.get("namespace")), str(meta["name"]), str(spec["node"]), str(spec["pod"]), handle
        )
        return holder, [str(a) for a in spec.get("ips", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class AddressIndex:
    """address -> the WorkloadEndpoints that hold it, kept by key as the watch brings them."""

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[AddressHolder, list[str]]] = {}
        self._by_address: dict[str, dict[str, AddressHolder]] = {}

    def put(self, key: str, value: bytes) -> None:
        self.delete(key)
        found = _holder(value)
        if found is None:
            return
        self._by_key[key] = found
        for address in found[1]:
            self._by_address.setdefault(address, {})[key] = found[0]

    def delete(self, key: str) -> None:
        old = self._by_key.pop(key, None)
        if old is None:
            return
        for address in old[1]:
            holders = self._by_address.get(address, {})
            holders.pop(key, None)
            if not holders:
                self._by_address.pop(address, None)

    def holders(self, address: str) -> list[AddressHolder]:
        return list(self._by_address.get(address, {}).values())


class ClusterCache:
    def __init__(self, datastore: EtcdDatastore, prefix: str, on_change: Callable[[], object]) -> None:
        self.datastore = datastore
        self.prefix = prefix.rstrip("/") + "/"
        self._on_change = on_change
        self._ignored = heartbeats_prefix(prefix)
        self._endpoints_root = f"{resources_prefix(prefix)}{WORKLOAD_ENDPOINT.plural}/"
        self._addresses = AddressIndex()
        self._values: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-cache", daemon=True)
        self._watch: Any = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        self._thread.join(timeout=5)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self._revision, dict(self._values))

    def address_holders(self, address: str) -> list[AddressHolder]:
        """The WorkloadEndpoints that hold `address`, as the watch has brought them."""
        with self._lock:
            return self._addresses.holders(address)

    def _list(self) -> int:
        kvs, revision = self.datastore.list(self.prefix)
        with self._lock:
            self._values = {kv.key: (kv.value, kv.mod_revision) for kv in kvs if not kv.key.startswith(self._ignored)}
            self._revision = revision
            self._addresses = AddressIndex()
            for key, (value, _) in self._values.items():
                if key.startswith(self._endpoints_root):
                    self._addresses.put(key, value)
        self._synced.set()
        self._on_change()
        return revision

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                revision = self._list()
                self._watch = self.datastore.watch(self.prefix, revision + 1)
                backoff = 0.2
                while not self._stop.is_set():
                    event = self._watch.get(timeout=1.0)
                    if event is None or event.key.startswith(self._ignored):
                        continue
                    with self._lock:
                        endpoint = event.key.startswith(self._endpoints_root)
                        if event.kind == "delete":
                            self._values.pop(event.key, None)
                            if endpoint:
                                self._addresses.delete(event.key)
                        else:
                            self._values[event.key] = (event.value, event.mod_revision)
                            if endpoint:
                                self._addresses.put(event.key, event.value)
                        self._revision = max(self._revision, event.mod_revision)
                    self._on_change()
            except DatastoreError as exc:
                if self._stop.is_set():
                    return
                log.warning("datastore watch broke; listing again", extra={"error": str(exc)})
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = None
