"""NetworkPolicy conformance on a 3-node lab: the hand-written scenarios of policy_scenarios.py
played against the real datapath, with `tulle policy trace` checked against every cell.

Pods x/a, y/a, z/a on node1, the b's on node2, the c's on node3, so every matrix has pairs on
one node and across nodes; ingress is enforced on the destination's node, egress on the
source's. The full suite runs in hybrid mode (node1-node2 direct, node1-node3 through VXLAN);
a sample of scenarios runs in host-gw and vxlan mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tulle.datastore.base import Datastore
from tulle.lab.cluster import Lab
from tulle.lab.probe import ServerSet, probe_matrix, sctp_init_seen
from tulle.model.kinds import NAMESPACE, NETWORK_POLICY, POD, WORKLOAD_ENDPOINT, lookup
from tulle.model.validation import admit, admit_all
from tulle.policy.compiler import compile_policies
from tulle.policy.inputs import inputs_from_objects
from tulle.policy.trace import trace

from ..lablib import running_lab, state
from .policy_scenarios import (
    NAMESPACES,
    NODE_OF_POD,
    POD_NAMES,
    PODS,
    SCENARIOS,
    Scenario,
    run_scenario,
    scenario_named,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

PROBE_TIMEOUT = 0.3  # a dropped probe costs this; the runner re-probes until the matrix settles
NAMED_PORTS = [
    {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
    for port in (80, 81)
    for proto in ("TCP", "UDP")
]


class LabCluster:
    """The PolicyCluster of policy_scenarios.py, on a lab, through the same code paths as
    `tulle apply` / `tulle label` (admission, then an atomic write)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        pods = state(lab)["pods"]
        self.netns = {pod: pods[pod]["netns"] for pod in PODS}
        self.ips = {pod: pods[pod]["ips"] for pod in PODS}
        self.disagreements: list[str] = []
        self.cells_traced = 0

    def _store(self, fn: Any) -> Any:
        return self.lab.with_store(state(self.lab), fn)

    def reset(self) -> None:
        def work(store: Datastore) -> None:
            for policy in store.list(NETWORK_POLICY)[0]:
                store.delete(NETWORK_POLICY, policy["metadata"]["name"], policy["metadata"]["namespace"])
            for ns in NAMESPACES:
                self._set_labels(store, NAMESPACE, ns, None, {"ns": ns, "kubernetes.io/metadata.name": ns}, exact=True)
                for pod in POD_NAMES:
                    self._set_labels(store, POD, pod, ns, {"pod": pod}, exact=True)

        self._store(work)

    @staticmethod
    def _set_labels(
        store: Datastore,
        kind: Any,
        name: str,
        namespace: str | None,
        labels: dict[str, str | None],
        exact: bool,
    ) -> None:
        obj = store.get(kind, name, namespace)
        assert obj is not None, f"{kind.kind} {namespace}/{name} is missing"
        current = {} if exact else dict(obj["metadata"].get("labels", {}))
        for key, value in labels.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        if obj["metadata"].get("labels", {}) == current:
            return
        obj["metadata"]["labels"] = current
        store.update(admit(obj, store))  # compare-and-swap on the revision read

    def apply(self, yaml_text: str) -> None:
        objects = [o for o in yaml.safe_load_all(yaml_text) if o]
        self._store(lambda store: store.apply_many(objects, admit=admit_all))

    def delete(self, kind: str, name: str, namespace: str | None) -> None:
        self._store(lambda store: store.delete(lookup(kind), name, namespace))

    def label(self, kind: str, name: str, namespace: str | None, labels: dict[str, str | None]) -> None:
        self._store(lambda store: self._set_labels(store, lookup(kind), name, namespace, labels, exact=False))

    def address(self, pod: str, family: int) -> str:
        return next(ip for ip in self.ips[pod] if (":" in ip) == (family == 6))

    def _traced(self, port: int, protocol: str, family: int) -> dict[tuple[str, str], bool]:
        """What `tulle policy trace` says for every cell, from the objects in the datastore."""

        def read(store: Datastore) -> list[list[dict[str, Any]]]:
            return [store.list(k)[0] for k in (NAMESPACE, POD, NETWORK_POLICY, WORKLOAD_ENDPOINT)]

        model = compile_policies(inputs_from_objects(*self._store(read)))
        return {
            (src, dst): trace(model, self.address(src, family), self.address(dst, family), protocol, port).allowed
            for src in PODS
            for dst in PODS
            if src != dst
        }

    def reachability(self, port: int, protocol: str, family: int) -> dict[tuple[str, str], bool]:
        addresses = {pod: self.address(pod, family) for pod in PODS}
        observed = probe_matrix(self.netns, addresses, port, protocol, PROBE_TIMEOUT)
        # The trace must agree with the datapath on every cell (a pod to itself never leaves its
        # namespace, so the datapath never sees it). Enforcement converges within a second or
        # so; a disagreement that outlives that is recorded and fails the test.
        deadline = time.monotonic() + 5
        while True:
            traced = self._traced(port, protocol, family)
            wrong = sorted(cell for cell, verdict in traced.items() if observed[cell] != verdict)
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.1)
            observed = probe_matrix(self.netns, addresses, port, protocol, PROBE_TIMEOUT)
        self.cells_traced += len(traced)
        for src, dst in wrong:
            self.disagreements.append(
                f"{src} -> {dst} {protocol}/{port} IPv{family}: datapath says "
                f"{'reachable' if observed[(src, dst)] else 'blocked'}, trace says the opposite"
            )
        return observed


def deploy(lab: Lab) -> LabCluster:
    for ns in NAMESPACES:
        for pod in POD_NAMES:
            lab.add_pod(NODE_OF_POD[pod], ns, pod, {"pod": pod}, NAMED_PORTS)
    return LabCluster(lab)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    with running_lab("pc", nodes=3, mode="hybrid") as lab:
        cluster = deploy(lab)
        with ServerSet(cluster.netns.values()):
            yield cluster


CASES = [(s, f) for s in SCENARIOS for f in s.families]


@pytest.mark.parametrize(("scenario", "family"), CASES, ids=[f"{s.name}-v{f}" for s, f in CASES])
def test_scenario(cluster: LabCluster, scenario: Scenario, family: int) -> None:
    before = len(cluster.disagreements)
    run_scenario(cluster, scenario, family, retry_seconds=0.1, parallel=True)
    assert cluster.disagreements[before:] == []


def test_the_suite_is_big_enough(cluster: LabCluster) -> None:
    assert len(SCENARIOS) >= 40
    assert cluster.cells_traced > 0 or not SCENARIOS


SAMPLE = [
    "deny-ingress-namespace-x",
    "deny-egress-namespace-x",
    "ingress-namespace-and-pod-in-one-peer",
    "ingress-named-port",
    "egress-ip-block-except",
    "policy-selects-pod-once-labelled",
]


@pytest.mark.parametrize("mode", ["host-gw", "vxlan"])
def test_sample_in_other_modes(mode: str) -> None:
    names = [n for n in SAMPLE if any(s.name == n for s in SCENARIOS)]
    assert len(names) >= 4, f"sample scenarios missing from the suite: {set(SAMPLE) - set(names)}"
    with running_lab(mode[:2], nodes=3, mode=mode) as lab:
        cluster = deploy(lab)
        with ServerSet(cluster.netns.values()):
            for name in names:
                scenario = scenario_named(name)
                for family in scenario.families:
                    run_scenario(cluster, scenario, family, retry_seconds=0.1, parallel=True)
    assert cluster.disagreements == []


# -- SCTP: no SCTP sockets on this kernel, so crafted packets, seen or not at the destination --


@pytest.mark.parametrize("family", [4, 6])
def test_sctp_rule_across_nodes(cluster: LabCluster, family: int) -> None:
    """x/a (node1) admits SCTP/80 from pods labelled pod=b (node2) only; x/c (node3) is refused,
    and so is SCTP/81, while without a policy both pass."""
    cluster.reset()
    a = cluster.address("x/a", family)

    def seen(src: str, port: int) -> bool:
        return any(sctp_init_seen(cluster.netns[src], cluster.netns["x/a"], a, port) for _ in range(3))

    assert seen("x/c", 80) and seen("x/b", 81)
    cluster.apply(
        """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sctp-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{protocol: SCTP, port: 80}]
"""
    )
    deadline = time.monotonic() + 10
    while seen("x/c", 80) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen("x/b", 80)
    assert not seen("x/c", 80)
    assert not sctp_init_seen(cluster.netns["x/b"], cluster.netns["x/a"], a, 81)
    cluster.reset()
