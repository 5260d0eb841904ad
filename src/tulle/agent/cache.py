"""The agent's view of the cluster: every key under the prefix, kept current by list + watch.

One watch on the whole prefix (a few thousand small keys even in a large cluster): the cache
lists once, then applies the watch's changes from the listed revision on, so no change is
missed. If the watch breaks or its revision was compacted, it lists again. Readers get
immutable snapshots; a change wakes whoever waits for one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tulle.datastore.base import DatastoreError
from tulle.datastore.etcd import EtcdDatastore
from tulle.ipam.allocator import blocks_prefix
from tulle.model.kinds import Kind
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


class ClusterCache:
    def __init__(self, datastore: EtcdDatastore, prefix: str, on_change: Callable[[], object]) -> None:
        self.datastore = datastore
        self.prefix = prefix.rstrip("/") + "/"
        self._on_change = on_change
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

    def _list(self) -> int:
        kvs, revision = self.datastore.list(self.prefix)
        with self._lock:
            self._values = {kv.key: (kv.value, kv.mod_revision) for kv in kvs}
            self._revision = revision
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
                    if event is None:
                        continue
                    with self._lock:
                        if event.kind == "delete":
                            self._values.pop(event.key, None)
                        else:
                            self._values[event.key] = (event.value, event.mod_revision)
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
