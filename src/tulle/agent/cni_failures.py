"""The last CNI failure of each pod on this node, kept for the node's report on its Node object
(`model/node_report.py`), as the kubelet records a failed sandbox set-up as an event on the Pod:
`tulle describe pod` shows it, also to someone who cannot reach this node.

The CNI service tells it each error it answers; it calls `on_change` (the node controller's
enqueue), so a burst of failures is one write of the Node, made by the node controller's sync.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tulle.agent.cni_service import pod_identity
from tulle.cni.spec import CniError
from tulle.model.node_report import CniFailure, cni_failure, with_failure

# Commands that concern one pod; STATUS, GC and VERSION concern the node or the plugin.
POD_COMMANDS = ("ADD", "DEL", "CHECK")


class CniFailureLog:
    def __init__(self, on_change: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time) -> None:
        self.on_change = on_change
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: tuple[CniFailure, ...] = ()

    def record(self, request: dict[str, Any], error: Any) -> None:
        """Keep `error` (a CNI error object) as the pod's last failure; a request that names no
        valid pod (its args are what failed) concerns no pod, and is only the runtime's to see."""
        command = request.get("command")
        if command not in POD_COMMANDS:
            return
        try:
            namespace, pod = pod_identity(request)
        except CniError:
            return
        failure = cni_failure(f"{namespace}/{pod}", str(command), error, self.clock())
        with self._lock:
            self._failures = with_failure(self._failures, failure)
        self.on_change()

    def snapshot(self) -> tuple[CniFailure, ...]:
        with self._lock:
            return self._failures
