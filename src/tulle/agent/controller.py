"""The controller pattern: handlers enqueue keys, one worker syncs each key from current state.

A burst of events for one key costs one sync (the queue is a set); a sync that fails is tried
again with a growing delay (client-go's work queue, kube-controller-manager's shape). Two
periodic keys: every `resync` seconds FULL, a sync of everything from the informers' state
that writes only what differs (cheap: no kernel reads), and every `verify` seconds VERIFY,
which also reads what the kernel has and repairs drift (as Calico's Felix refreshes its
routes and rules every 90 s): reading a node's tables costs in proportion to its pods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FULL = "*"  # the key of a full sync from the informers' state
VERIFY = "*verify"  # the key of a full sync that also compares with the kernel


class Controller:
    """Subclasses implement `sync(key)`; everything else calls `enqueue(key)`.

    >>> class Echo(Controller):
    ...     def sync(self, key: str) -> None:
    ...         print("sync", key)
    >>> echo = Echo("echo", resync=0)
    >>> echo.enqueue("a"); echo.enqueue("a"); echo.run_pending()
    sync a
    """

    def __init__(self, name: str, resync: float = 30.0, verify: float = 0.0) -> None:
        self.name = name
        self.resync = resync
        self.verify = verify
        self._cond = threading.Condition()
        self._queued: dict[str, float] = {}  # key -> not before (time.monotonic())
        self._failures: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_full = 0.0
        self._last_verify = 0.0
        self.last_error = ""
        self.last_error_at = 0.0
        self.synced_keys = 0  # syncs done: for tests and benchmarks of the work per event

    def sync(self, key: str) -> None:
        raise NotImplementedError

    def enqueue(self, key: str = FULL, after: float = 0.0) -> None:
        """Ask for a sync of `key` (after `after` seconds); several asks before it runs make one."""
        with self._cond:
            when = time.monotonic() + after
            if key not in self._queued or when < self._queued[key]:
                self._queued[key] = when
            self._cond.notify_all()

    def _due(self) -> list[str]:
        now = time.monotonic()
        due = [k for k, when in self._queued.items() if when <= now]
        for k in due:
            del self._queued[k]
        # VERIFY, then FULL first: they cover every other key, which then cost nothing new.
        return sorted(due, key=lambda k: (k != VERIFY, k != FULL))

    def run_pending(self) -> None:
        """Sync every key that is due, in this thread (the worker does this; so can a test)."""
        with self._cond:
            keys = self._due()
        for key in keys:
            self._sync_one(key)

    def _sync_one(self, key: str) -> None:
        try:
            self.sync(key)
        except Exception as exc:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = time.time()
            delay = min(0.2 * 2 ** (failures - 1), 10.0)
            log.warning("sync failed; trying again", extra={"controller": self.name, "key": key, "error": str(exc)})
            self.enqueue(key, after=delay)
            return
        self.synced_keys += 1
        if self._failures.pop(key, None) is not None and not self._failures:
            self.last_error = ""

    def start(self) -> None:
        self._last_full = self._last_verify = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"controller {self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                now = time.monotonic()
                if self.resync and now - self._last_full >= self.resync:
                    self._queued[FULL] = now
                    self._last_full = now
                if self.verify and now - self._last_verify >= self.verify:
                    self._queued[VERIFY] = now
                    self._last_verify = now
                nexts = [when for when in self._queued.values()]
                if self.resync:
                    nexts.append(self._last_full + self.resync)
                if self.verify:
                    nexts.append(self._last_verify + self.verify)
                wait = max(0.0, min(nexts) - now) if nexts else None
                if wait is None or wait > 0:
                    self._cond.wait(wait)  # enqueue and stop notify: no need to wake to look
                    continue
                keys = self._due()
            for key in keys:
                if self._stop.is_set():
                    return
                self._sync_one(key)


class TableController(Controller):
    """A controller whose every key brings one whole table up to date (`apply_pass`), which an
    ADD may also ask for in its own thread (`sync_now`) before it replies."""

    def __init__(self, name: str, resync: float = 30.0, verify: float = 0.0) -> None:
        super().__init__(name, resync=resync, verify=verify)
        self._lock = threading.Lock()
        self._pass_started = 0.0

    def apply_pass(self, verify: bool) -> None:
        raise NotImplementedError

    def sync(self, key: str) -> None:
        with self._lock:
            self._pass(verify=key == VERIFY)

    def sync_now(self) -> None:
        """Bring the table up to date in the caller's thread; callers queued on the lock share
        one pass: a pass that started after a caller arrived covers it."""
        arrived = time.monotonic()
        with self._lock:
            if self._pass_started > arrived:
                return
            self._pass(verify=False)

    def _pass(self, verify: bool) -> None:
        self._pass_started = time.monotonic()
        self.apply_pass(verify)


def every(interval: float, stop: threading.Event, fn: Callable[[], None], name: str) -> threading.Thread:
    """Run `fn` every `interval` seconds in a thread of its own until `stop` is set."""

    def loop() -> None:
        while not stop.wait(interval):
            try:
                fn()
            except Exception:
                log.exception("periodic work failed", extra={"work": name})

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
