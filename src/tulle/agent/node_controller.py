"""This node in the datastore: its Node object, which every other node routes by, and its
heartbeat, which only says that this agent is alive (docs/design/agent.md).

The Node object belongs to the node: it is written by compare-and-swap only where it differs
from what routing needs (keeping what others set on it), and written again if somebody deletes
it while the node is up. The heartbeat is renewed every TTL/3; an outage longer than the TTL
only makes the next renewal begin it again: no Node object, and so no route anywhere, moves.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable

from tulle.agent.controller import FULL, Controller, every
from tulle.agent.informers import Informer
from tulle.agent.node import installed_version, merge_registration, node_object
from tulle.dataplane.host import Underlay
from tulle.datastore.base import Conflict, Datastore, DatastoreError
from tulle.model.kinds import NODE
from tulle.routing.compile import NodeInfo, VxlanEndpoint

log = logging.getLogger(__name__)


class NodeController(Controller):
    def __init__(
        self,
        datastore: Datastore,
        node: str,
        mode: str,
        underlay: Underlay,
        vxlan: Callable[[], list[VxlanEndpoint]],
        nodes: Informer[NodeInfo],
        lease_ttl: int,
        resync: float = 30.0,
        report: Callable[[], dict[str, str]] = lambda: {},
    ) -> None:
        super().__init__("node", resync)
        # Annotations for readers, not for routing (`model/node_report.py`), written by a sync
        # when they differ; each heartbeat looks whether they changed (in memory, no read).
        self.report = report
        self._reported: dict[str, str] | None = None
        self.datastore = datastore
        self.node = node
        self.mode = mode
        self.underlay = underlay
        self.vxlan = vxlan
        self.lease_ttl = lease_ttl
        self.agent_version = installed_version()  # published on our Node: `tulle version`
        self.registered = False
        self.heartbeat = datastore.heartbeat(node, lease_ttl)
        nodes.add_handler(self._on_node)

    def _on_node(self, key: str, _old: NodeInfo | None, new: NodeInfo | None) -> None:
        if key == self.node and new is None:
            log.warning("our Node object was deleted while the node is up; registering again")
            self.enqueue(FULL)

    def sync(self, key: str) -> None:
        self.register()

    def register(self) -> None:
        """Our Node object as routing needs it, written only where it differs (compare-and-swap,
        keeping what others set on it): a restart that changes nothing writes nothing."""
        addresses = [str(ipaddress.ip_interface(a).ip) for a in self.underlay.addresses]
        wanted = node_object(self.node, self.mode, addresses, self.vxlan(), self.agent_version)
        report = self.report()
        wanted["metadata"]["annotations"].update(report)
        for _attempt in range(10):
            current = self.datastore.get(NODE, self.node)
            try:
                if current is None:
                    self.datastore.create(wanted)
                    log.info("registered node", extra={"node": self.node, "addresses": addresses})
                else:
                    merged = merge_registration(current, wanted)
                    if merged != current:
                        self.datastore.update(merged)
                        log.info("updated the node's registration", extra={"addresses": addresses})
            except Conflict:
                continue  # written by somebody meanwhile: read again
            self.registered = True
            self._reported = report
            return
        raise DatastoreError(f"Node {self.node} keeps changing; will register on the next pass")

    def start_heartbeat(self, stop: threading.Event) -> None:
        """Beat now (replacing an earlier agent's heartbeat), then every TTL/3 in a thread. A
        failed renewal is the datastore's reachability to report, not a log line per beat."""
        self.heartbeat.start()

        def renew() -> None:
            try:
                self.heartbeat.renew()
            except DatastoreError:
                pass
            if self._reported is not None and self.report() != self._reported:
                self.enqueue(FULL)  # a problem came or went: readers learn it within a beat

        every(max(1.0, self.lease_ttl / 3), stop, renew, "heartbeat")

    def problems(self) -> list[str]:
        return [] if self.registered else ["the node is not registered"]
