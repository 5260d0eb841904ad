"""A node's heartbeat: whether its agent is alive, kept apart from the node's registration.

The Node object (its addresses and VXLAN endpoints) is what every other node routes by; it
lives until the node is removed. The heartbeat only says that the node's agent is running: a
small key under a lease the agent keeps alive, gone when the agent has been silent for the
lease's TTL. Liveness is reported (`tulle status`, `tulle get nodes`), never acted on: a node
whose agent is down, restarting or cut off from the datastore keeps its routes and blocks
(docs/design/datastore.md, invariant 6), as Calico's and Cilium's do.

Keepalives do not change the key, so a heartbeat costs no watch event while it lives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tulle.datastore.base import Datastore, DatastoreError

log = logging.getLogger(__name__)


def heartbeats_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/heartbeats/"


def heartbeat_key(prefix: str, node: str) -> str:
    return heartbeats_prefix(prefix) + node


@dataclass(frozen=True)
class Heartbeat:
    node: str
    started: float  # when the agent that keeps it started (wall clock)
    pid: int
    lease: int


def live_heartbeats(datastore: Datastore, prefix: str) -> dict[str, Heartbeat]:
    """The nodes whose agent is alive now, by node name."""
    kvs, _ = datastore.list(heartbeats_prefix(prefix))
    out = {}
    for kv in kvs:
        try:
            body = json.loads(kv.value)
            beat = Heartbeat(
                node=str(body["node"]), started=float(body["started"]), pid=int(body["pid"]), lease=kv.lease
            )
        except (ValueError, KeyError, TypeError):
            continue
        out[beat.node] = beat
    return out


class NodeHeartbeat:
    """The heartbeat of this node's agent: `start` once, then `renew` every TTL/3.

    >>> beat = NodeHeartbeat(store, "/tulle", "node1", ttl=15)  # doctest: +SKIP
    >>> beat.start(); beat.renew()                               # doctest: +SKIP
    """

    def __init__(self, datastore: Datastore, prefix: str, node: str, ttl: int) -> None:
        self.datastore = datastore
        self.key = heartbeat_key(prefix, node)
        self.node = node
        self.ttl = ttl
        self.lease = 0
        self._started = time.time()

    def _put(self) -> None:
        self.lease = self.datastore.grant_lease(self.ttl)
        body = {"node": self.node, "started": self._started, "pid": os.getpid()}
        self.datastore.put(self.key, json.dumps(body, sort_keys=True).encode(), lease=self.lease)

    def start(self) -> None:
        """Beat under a new lease, and end the lease an earlier agent of this node left behind:
        put first, then revoke, so the key never disappears in between."""
        before = self.datastore.get(self.key)
        self._put()
        if before is not None and before.lease and before.lease != self.lease:
            self.datastore.revoke_lease(before.lease)
            log.info("revoked the lease of an earlier agent", extra={"lease": before.lease})

    def renew(self) -> bool:
        """Keep the lease alive; after an outage longer than the TTL the lease is gone, so beat
        under a new one. True if it had to. Raises DatastoreError when the datastore is away."""
        if self.datastore.keepalive(self.lease) > 0:
            return False
        self._put()
        log.info("the heartbeat's lease had expired; beating under a new one", extra={"lease": self.lease})
        return True

    def keep_alive(self, stop_wait: Callable[[float], bool]) -> None:
        """Renew every TTL/3 until `stop_wait(period)` (an Event's wait) says to stop. An outage is
        recorded by the datastore's reachability, not logged here on every beat."""
        period = max(1.0, self.ttl / 3)
        while not stop_wait(period):
            try:
                self.renew()
            except DatastoreError:
                continue
