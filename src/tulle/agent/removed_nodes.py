"""What a removed node leaves behind: its Pods, its WorkloadEndpoints and its blocks, collected a
grace period (`--node-grace`) after its Node object is deleted, as Kubernetes' pod garbage
collector deletes the pods of a node that no longer exists and Calico's IPAM garbage collection
frees its blocks.

Invariants (docs/design/ipam.md, 8; docs/design/agent.md, 7):
- only a node whose Node object is gone, and has been for the whole grace period, loses
  anything; a node whose agent is merely silent keeps its Node object, and so everything;
- a node is known to have been real by the blocks it holds: Pods that name a node which never
  held a block (objects written for a benchmark, say) are not this controller's business;
- every agent collects at once, so every delete is delete-if-unchanged (at the resourceVersion
  read) and idempotent: an object rewritten since (a Pod scheduled again elsewhere) is looked
  at afresh on the next pass, never deleted on an old reading;
- Pods go first, then endpoints, then each block in which no endpoint holds an address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tulle.agent.controller import Controller
from tulle.agent.informers import Informer
from tulle.datastore.base import Conflict, Datastore, Obj
from tulle.ipam.allocator import Block, release_node_blocks
from tulle.model.kinds import NODE, POD, WORKLOAD_ENDPOINT, Kind
from tulle.routing.compile import NodeInfo

log = logging.getLogger(__name__)

GONE = "gone-nodes"
RETRY_CHANGED = 1.0  # seconds before looking again at a node whose objects changed under us


@dataclass(frozen=True)
class GraceDecision:
    due: tuple[str, ...]  # gone for the whole grace period: collect them now
    waiting: dict[str, float] = field(default_factory=dict)  # node -> gone since, within the grace
    next_look: float | None = None  # seconds until the first waiting one falls due


def decide(gone: Iterable[str], since: Mapping[str, float], now: float, grace: float) -> GraceDecision:
    """Which of the nodes seen gone are due for collection: a node's clock starts when it is
    first seen gone and is forgotten once it is seen present again (it is not in `gone`).

    >>> d = decide(["a", "b"], {"a": 0.0}, now=50.0, grace=60.0)
    >>> d.due, d.waiting, d.next_look
    ((), {'a': 0.0, 'b': 50.0}, 10.0)
    >>> decide(["a"], {"a": 0.0, "c": 1.0}, now=60.0, grace=60.0)
    GraceDecision(due=('a',), waiting={}, next_look=None)
    """
    due: list[str] = []
    waiting: dict[str, float] = {}
    for node in sorted(set(gone)):
        started = since.get(node, now)
        if now - started >= grace:
            due.append(node)
        else:
            waiting[node] = started
    next_look = min((grace - (now - s) for s in waiting.values()), default=None)
    return GraceDecision(tuple(due), waiting, next_look)


def pods_on(objects: Iterable[Obj], node: str) -> list[Obj]:
    """The Pod objects scheduled on `node`."""
    return [o for o in objects if (o.get("spec") or {}).get("nodeName") == node]


def endpoints_on(objects: Iterable[Obj], node: str) -> list[Obj]:
    """The WorkloadEndpoint objects of `node`."""
    return [o for o in objects if (o.get("spec") or {}).get("node") == node]


def held_addresses(endpoints: Iterable[Obj]) -> set[str]:
    return {str(ip) for o in endpoints for ip in (o.get("spec") or {}).get("ips") or []}


class RemovedNodeController(Controller):
    """Collects the leftovers of nodes removed a grace period ago. Every agent runs one."""

    def __init__(
        self,
        datastore: Datastore,
        node: str,
        nodes: Informer[NodeInfo],
        blocks: Informer[Block],
        node_grace: float,
        resync: float = 30.0,
    ) -> None:
        super().__init__("removed-nodes", resync)
        self.datastore = datastore
        self.node = node
        self.nodes = nodes
        self.blocks = blocks
        self.node_grace = node_grace
        self._gone_since: dict[str, float] = {}
        nodes.add_handler(self._on_node)
        blocks.add_handler(self._on_block)

    def _on_node(self, _key: str, _old: NodeInfo | None, new: NodeInfo | None) -> None:
        if new is None:
            self.enqueue(GONE)

    def _on_block(self, _key: str, _old: Block | None, new: Block | None) -> None:
        if new is not None and new.node != self.node and self.nodes.get(new.node) is None:
            self.enqueue(GONE)

    def sync(self, key: str) -> None:
        self.collect()

    def collect(self) -> None:
        """Collect the nodes gone for the grace period; look again when the next falls due."""
        if not (self.nodes.synced and self.blocks.synced):
            return
        gone = [o for o in self.blocks.index_values("node") if o != self.node and self.nodes.get(o) is None]
        now = time.monotonic()
        decision = decide(gone, self._gone_since, now, self.node_grace)
        since, self._gone_since = self._gone_since, dict(decision.waiting)
        next_look = decision.next_look
        for node in decision.due:
            if not self._forget_node(node):
                # Something of it changed as we deleted: still due, looked at again shortly.
                self._gone_since[node] = since.get(node, now - self.node_grace)
                next_look = min(next_look if next_look is not None else RETRY_CHANGED, RETRY_CHANGED)
        if next_look is not None:
            self.enqueue(GONE, after=next_look + 0.05)

    def _forget_node(self, node: str) -> bool:
        """Delete a removed node's Pods and endpoints, then free its blocks in which no endpoint
        holds an address; all read afresh, not from the informers. False if an object changed
        since it was read (it is then left for the next pass, and so are the blocks)."""
        if self.datastore.get(NODE, node) is not None:
            return True  # it came back: nothing of it is garbage
        pods = pods_on(self.datastore.list(POD)[0], node)
        settled = self._delete_unchanged(POD, pods, node)
        endpoints, _ = self.datastore.list(WORKLOAD_ENDPOINT)
        settled = self._delete_unchanged(WORKLOAD_ENDPOINT, endpoints_on(endpoints, node), node) and settled
        if not settled:
            return False
        held = held_addresses(self.datastore.list(WORKLOAD_ENDPOINT)[0])
        freed = release_node_blocks(self.datastore, node, held)
        if freed:
            log.info("freed the blocks of a removed node", extra={"node": node, "blocks": freed})
        return True

    def _delete_unchanged(self, kind: Kind, objects: list[Obj], node: str) -> bool:
        """Delete each object at the version read; True if none had changed meanwhile."""
        deleted, settled = [], True
        for obj in objects:
            meta = obj["metadata"]
            try:
                if self.datastore.delete(kind, meta["name"], meta.get("namespace"), meta.get("resourceVersion")):
                    deleted.append(f"{meta.get('namespace')}/{meta['name']}")
            except Conflict:
                settled = False  # rewritten since it was read (maybe now on a live node)
        if deleted:
            log.info(f"deleted the {kind.plural} of a removed node", extra={"node": node, "objects": deleted})
        return settled
