"""Shared informers: one list + watch per kind, each object decoded once into a typed value.

An informer lists its kind, keeps the decoded values by key ("namespace/name", or "name" for
cluster-scoped kinds) with the indexes its readers need, and applies the watch's events from
the listed version on, so no change is missed. When the watch breaks or its version expired,
it lists again and tells its handlers only what differs from what it held: a missed event is
healed by the next list, never by a full rebuild downstream.

Handlers run in the informer's thread and must only enqueue keys for a controller (client-go's
rule): a handler that does work would hold up every other reader of the kind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tulle.datastore.base import Datastore, DatastoreError, Obj, Watch, WatchExpired
from tulle.model.kinds import Kind

log = logging.getLogger(__name__)

T = TypeVar("T")

Handler = Callable[[str, "T | None", "T | None"], None]  # (key, old, new); None: absent


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


@dataclass(frozen=True)
class Entry(Generic[T]):
    value: T
    version: str


class Informer(Generic[T]):
    """One kind, decoded once. `decode` returns None for an object it cannot use (it is then
    treated as absent, and the reason logged once per version)."""

    def __init__(self, datastore: Datastore, kind: Kind, decode: Callable[[Obj], T | None]) -> None:
        self.datastore = datastore
        self.kind = kind
        self._decode = decode
        self._lock = threading.Lock()
        self._entries: dict[str, Entry[T]] = {}
        self._indexes: dict[str, Callable[[T], Iterable[str]]] = {}
        self._indexed: dict[str, dict[str, set[str]]] = {}
        self._handlers: list[Handler[T]] = []
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Watch | None = None
        self.version = ""
        self.lists = 0  # how often it listed: once, plus once per broken or expired watch

    # -- set-up -------------------------------------------------------------------------------

    def add_index(self, name: str, values: Callable[[T], Iterable[str]]) -> None:
        """An index of the values by what `values(value)` yields (e.g. pods by node)."""
        with self._lock:
            self._indexes[name] = values
            self._indexed[name] = {}
            for key, entry in self._entries.items():
                for v in values(entry.value):
                    self._indexed[name].setdefault(v, set()).add(key)

    def add_handler(self, handler: Handler[T]) -> None:
        self._handlers.append(handler)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer {self.kind.plural}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    # -- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> T | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry is not None else None

    def values(self) -> list[T]:
        with self._lock:
            return [entry.value for entry in self._entries.values()]

    def items(self) -> list[tuple[str, T]]:
        with self._lock:
            return [(key, entry.value) for key, entry in self._entries.items()]

    def by_index(self, name: str, value: str) -> list[T]:
        with self._lock:
            keys = self._indexed[name].get(value, set())
            return [self._entries[k].value for k in sorted(keys)]

    def index_values(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._indexed[name])

    # -- the loop -----------------------------------------------------------------------------

    def _decoded(self, obj: Obj) -> T | None:
        try:
            return self._decode(obj)
        except Exception as exc:  # a malformed object must never stop the informer
            log.warning("ignoring an object that cannot be read", extra={"kind": self.kind.kind, "error": str(exc)})
            return None

    def _set(self, key: str, new: Entry[T] | None) -> tuple[T | None, T | None] | None:
        """Store (or remove) one entry and keep the indexes; (old, new) if the value changed."""
        with self._lock:
            old = self._entries.get(key)
            if new is None:
                if old is None:
                    return None
                del self._entries[key]
            else:
                self._entries[key] = new
            for name, values in self._indexes.items():
                index = self._indexed[name]
                if old is not None:
                    for v in values(old.value):
                        keys = index.get(v)
                        if keys is not None:
                            keys.discard(key)
                            if not keys:
                                del index[v]
                if new is not None:
                    for v in values(new.value):
                        index.setdefault(v, set()).add(key)
        old_value = old.value if old is not None else None
        new_value = new.value if new is not None else None
        if old_value == new_value:
            return None
        return old_value, new_value

    def _notify(self, key: str, change: tuple[T | None, T | None] | None) -> None:
        if change is None:
            return
        for handler in self._handlers:
            try:
                handler(key, change[0], change[1])
            except Exception:
                log.exception("an informer handler failed", extra={"kind": self.kind.kind})

    def _relist(self) -> None:
        objects, version = self.datastore.list(self.kind)
        fresh: dict[str, Entry[T]] = {}
        for obj in objects:
            value = self._decoded(obj)
            if value is not None:
                fresh[object_key(obj)] = Entry(value, str(obj["metadata"].get("resourceVersion", "")))
        with self._lock:
            gone = [key for key in self._entries if key not in fresh]
        for key in gone:
            self._notify(key, self._set(key, None))
        for key, entry in fresh.items():
            self._notify(key, self._set(key, entry))
        self.version = version
        self.lists += 1
        self._synced.set()

    def _apply(self, event_type: str, obj: Obj) -> None:
        key = object_key(obj)
        version = str(obj.get("metadata", {}).get("resourceVersion", ""))
        value = None if event_type == "DELETED" else self._decoded(obj)
        self._notify(key, self._set(key, Entry(value, version) if value is not None else None))
        self.version = version or self.version

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._relist()
                watch = self.datastore.watch(self.kind, self.version)
                self._watch = watch
                backoff = 0.2
                while not self._stop.is_set():
                    # A long wait: stop() cancels the watch, which ends this one at once.
                    event = watch.get(timeout=30.0)
                    if event is not None:
                        self._apply(event.type, event.object)
            except WatchExpired as exc:
                log.info("a watch expired; listing again", extra={"kind": self.kind.kind, "reason": str(exc)})
            except DatastoreError as exc:
                if self._stop.is_set():
                    return
                log.debug("a watch broke; listing again", extra={"kind": self.kind.kind, "error": str(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                watch_now, self._watch = self._watch, None
                if watch_now is not None:
                    watch_now.cancel()
