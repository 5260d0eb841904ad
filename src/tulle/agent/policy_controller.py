"""The node's nftables table: masquerade for traffic leaving the pools and NetworkPolicy for the
local endpoints; and the cutting of established connections that a policy change denies.

One key: any change of a namespace, pod, policy, endpoint or pool marks the inputs changed and
asks for a pass; a burst is one pass. The model is compiled only when the inputs changed (a
periodic resync with nothing new only verifies the table against the kernel). An ADD calls
`sync_now`, so a new pod is isolated before the runtime starts its containers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tulle.agent.controller import TableController
from tulle.agent.endpoints import EndpointRegistry
from tulle.agent.informers import Informer
from tulle.dataplane import conntrack, host
from tulle.dataplane.nft import NftReconciler
from tulle.kernelstate.nft import NftTable
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.pools import Pool
from tulle.policy.compiler import PolicyModel, compile_policies
from tulle.policy.cutting import connections_to_cut
from tulle.policy.datapath import drop_counters, policy_table
from tulle.policy.inputs import EndpointSource, Namespace, PodSource, PolicyInputs, PolicySource, assemble_inputs
from tulle.routing.nat import nat_table

log = logging.getLogger(__name__)

POLICY = "policy"


class ConnectionCutter:
    """Cuts established connections a policy change denies, after the new rules are in place, in
    a thread of its own: a conntrack table of thousands of entries never delays enforcement.
    The newest request wins."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wanted: tuple[PolicyModel, list[str]] | None = None

    def request(self, model: PolicyModel, local_ips: list[str]) -> None:
        with self._cond:
            self._wanted = (model, local_ips)
            self._cond.notify_all()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                while self._wanted is None and not stop.is_set():
                    self._cond.wait(1.0)
                wanted, self._wanted = self._wanted, None
            if wanted is None:
                continue
            try:
                model, local = wanted
                doomed = connections_to_cut(model, local, conntrack.list_connections(), host.node_addresses())
                cut = conntrack.delete_connections(doomed) if doomed else 0
                if cut:
                    log.info("cut connections a policy change denies", extra={"count": cut})
            except Exception as exc:
                log.error("cannot cut denied connections", extra={"error": str(exc)})


class PolicyController(TableController):
    def __init__(
        self,
        node: str,
        mode: str,
        registry: EndpointRegistry,
        namespaces: Informer[Namespace],
        pods: Informer[PodSource],
        policies: Informer[PolicySource],
        endpoints: Informer[WorkloadEndpoint],
        pool_objects: Informer[Pool],
        pools: Callable[[], list[Pool]],
        nft: NftReconciler | None = None,
        cutter: ConnectionCutter | None = None,
        resync: float = 30.0,
        verify: float = 90.0,
    ) -> None:
        super().__init__("policy", resync, verify)
        self.node = node
        self.mode = mode
        self.registry = registry
        self.namespaces = namespaces
        self.pods = pods
        self.policies = policies
        self.endpoints = endpoints
        self.pools = pools  # IPAM's: validated, no overlaps (an interval set would refuse them)
        self.nft = nft or NftReconciler()
        self.cutter = cutter or ConnectionCutter()
        self.model: PolicyModel | None = None
        self.local_ips: list[str] = []
        self._generation = 0  # bumped by every change of the inputs
        self._compiled = -1
        self._warnings: tuple[str, ...] = ()
        self._rules: Any = None
        self._owners: dict[str, str] = {}
        for informer in (namespaces, pods, policies, endpoints, pool_objects):
            informer.add_handler(self._changed)

    def _changed(self, *_args: object) -> None:
        self.inputs_changed()

    def inputs_changed(self) -> None:
        """Something the table depends on changed (also: a local endpoint came or went)."""
        self._generation += 1
        self.enqueue(POLICY)

    # -- the pass -----------------------------------------------------------------------------

    def _inputs(self) -> PolicyInputs:
        """Every endpoint: the informer's for other nodes, this node's from its own registry,
        which knows a new pod before the watch brings its endpoint back."""
        local = [
            EndpointSource(ep.namespace, ep.pod, self.node, tuple(ep.addresses()))
            for ep in self.registry.all()
            if ep.state == "ready"
        ]
        remote = [
            EndpointSource(w.namespace, w.pod, w.node, w.ips) for w in self.endpoints.values() if w.node != self.node
        ]
        return assemble_inputs(self.namespaces.values(), self.pods.values(), self.policies.values(), local + remote)

    def apply_pass(self, verify: bool) -> None:
        generation = self._generation
        if self.model is None or generation != self._compiled:
            self._compile()
            self._compiled = generation
        assert self.model is not None
        table: NftTable = nat_table(self.pools()).merge(policy_table(self.model, self.local_ips))
        commands = self.nft.apply(table, verify=verify)
        if commands:
            log.debug("nftables updated", extra={"commands": len(commands)})

    def _compile(self) -> None:
        inputs = self._inputs()
        model = compile_policies(inputs, self.model)
        if inputs.warnings != self._warnings:
            for warning in inputs.warnings:
                log.warning("ignoring part of a resource", extra={"reason": warning})
            self._warnings = inputs.warnings
        local = [a for ep in self.registry.all() if ep.state == "ready" for a in ep.addresses()]
        # Connections can only become denied when policies, labels or named ports change, or when
        # an address moves to another pod; a new pod alone denies nothing that exists.
        rules = (inputs.namespaces, [(p.key, p.labels, p.named_ports) for p in inputs.pods], inputs.policies)
        owners = {a: p.key for p in inputs.pods for a in p.addresses}
        moved = any(owners.get(a) != owner for a, owner in self._owners.items())
        if rules != self._rules or moved:
            self.cutter.request(model, local)
        self._rules, self._owners = rules, owners
        self.model, self.local_ips = model, local

    # -- what status reports -----------------------------------------------------------------

    def drops(self) -> list[dict[str, Any]]:
        """Packets a policy dropped, per isolated local pod and direction."""
        model = self.model
        if model is None:
            return []
        names = drop_counters(model, self.local_ips)
        counters = self.nft.counters()
        out: list[dict[str, Any]] = []
        for counter, (pod, direction) in sorted(names.items()):
            packets, _bytes = counters.get(counter, (0, 0))
            out.append(
                {"pod": pod, "direction": direction, "family": 6 if "_v6_" in counter else 4, "packets": packets}
            )
        return out
