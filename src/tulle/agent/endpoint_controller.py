"""This node's endpoints, kept true: each ready endpoint's host side as ADD made it, its
WorkloadEndpoint published exactly as it is (and none for an endpoint this node does not
have), the DELs that waited carried out, and veths that belong to no endpoint removed.

Each change is made under the endpoint's lock after looking again, so an ADD or DEL in flight
is never undone by a resync that read a moment earlier.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tulle.agent.cni_service import CniService, is_host_veth, pod_interface
from tulle.agent.controller import FULL, VERIFY, Controller, every
from tulle.agent.endpoints import Endpoint, EndpointRegistry
from tulle.agent.informers import Informer
from tulle.agent.pending import PendingDeletes
from tulle.dataplane import host, podnet
from tulle.datastore.base import Datastore
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import WORKLOAD_ENDPOINT

log = logging.getLogger(__name__)

PUBLISH = "publish"
PENDING = "pending"


class EndpointController(Controller):
    def __init__(
        self,
        datastore: Datastore,
        node: str,
        registry: EndpointRegistry,
        pending: PendingDeletes,
        cni: CniService,
        endpoints: Informer[WorkloadEndpoint],
        resync: float = 30.0,
        verify: float = 90.0,
        problems: Callable[[str, str], tuple[str, ...]] = lambda _ns, _pod: (),
    ) -> None:
        super().__init__("endpoints", resync, verify)
        self.problems = problems  # what the agent cannot honour for a pod, shown on its endpoint
        self.datastore = datastore
        self.node = node
        self.registry = registry
        self.pending = pending
        self.cni = cni
        self.endpoints = endpoints
        endpoints.add_handler(self._on_endpoint)

    def _on_endpoint(self, _key: str, old: WorkloadEndpoint | None, new: WorkloadEndpoint | None) -> None:
        if (old is not None and old.node == self.node) or (new is not None and new.node == self.node):
            self.enqueue(PUBLISH)

    def watch_pending(self, stop: threading.Event, interval: float = 2.0) -> None:
        """Replay DELs soon after they are recorded (or the datastore is back): a look at a
        folder every `interval` seconds, work only when something waits."""
        every(interval, stop, lambda: self.enqueue(PENDING) if self.pending.names() else None, "pending-dels")

    def sync(self, key: str) -> None:
        if key == PENDING:
            self.pending.replay(self.cni.delete_now)
            return
        if key == VERIFY:
            self.recover(startup=False)  # each pod's host side read back from the kernel
        if key in (FULL, VERIFY):
            self.pending.replay(self.cni.delete_now)
        self.sync_published()

    # -- the host sides ---------------------------------------------------------------------

    def recover(self, startup: bool) -> None:
        """Forget endpoints whose pod is gone and repair the rest; at start-up also roll back
        ADDs that an earlier agent left half-done (later, an endpoint being added is an ADD in
        flight)."""
        ready = []
        for ep in self.registry.all():
            if ep.state == "ready":
                ready.append(ep)
            elif startup:
                log.info("rolling back a half-done ADD", extra={"pod": f"{ep.namespace}/{ep.pod}"})
                self.cni.teardown_or_defer(ep)
        changed = podnet.repair_host_sides([(pod_interface(ep), ep.mac) for ep in ready])
        for ep in ready:
            what = changed.get(ep.host_ifname)
            if not what:
                continue
            if what == ["host interface missing"]:
                self._forget_if_gone(ep)
                continue
            log.info("repaired a pod's host side", extra={"pod": f"{ep.namespace}/{ep.pod}", "changed": what})

    def _forget_if_gone(self, ep: Endpoint) -> None:
        with self.cni.lock(ep.handle):
            current = self.registry.get(ep.network, ep.container_id, ep.ifname)
            if current is not None and current.state == "ready" and not podnet.host_side_exists(ep.host_ifname):
                log.info("removing an endpoint whose pod is gone", extra={"pod": f"{ep.namespace}/{ep.pod}"})
                self.cni.teardown_or_defer(current)

    def remove_stray_interfaces(self) -> int:
        """Delete host-side veths of Tulle's that no endpoint has (a crash between steps)."""
        known = {ep.host_ifname for ep in self.registry.all()}
        return host.delete_links(n for n in host.link_names() if is_host_veth(n) and n not in known)

    # -- the WorkloadEndpoints --------------------------------------------------------------

    def sync_published(self) -> None:
        """Our WorkloadEndpoints are exactly our ready endpoints: publish what is missing or
        differs (after a restart, or deleted behind our back), delete what no endpoint of ours
        has. The registry is read after the informer, so what the informer lacks has not been
        published yet or was deleted, never the other way round."""
        published = {wep.name: wep for wep in self.endpoints.by_index("node", self.node)}
        mine = {}
        for ep in self.registry.all():
            if ep.state == "ready":
                wep = ep.workload(self.node, self.problems(ep.namespace, ep.pod))
                mine[wep.name] = (ep, wep)
        for name, (ep, wep) in mine.items():
            if published.get(name) == wep:
                continue
            with self.cni.lock(ep.handle):
                current = self.registry.get(ep.network, ep.container_id, ep.ifname)
                if current is not None and current.state == "ready":
                    log.info("publishing an endpoint again", extra={"pod": f"{ep.namespace}/{ep.pod}"})
                    self.cni.publish(current, wep.problems)
        for name, wep in published.items():
            if name in mine:
                continue
            with self.cni.lock(wep.handle):
                current = self.registry.get(wep.network, wep.container_id, wep.ifname)
                if current is not None and current.state == "ready":
                    continue  # added meanwhile
                log.info("deleting an endpoint no pod of this node has", extra={"endpoint": wep.key})
                self.datastore.delete(WORKLOAD_ENDPOINT, wep.name, wep.namespace)
