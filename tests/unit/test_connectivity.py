"""`tulle connectivity test` without root: the plan, the verdicts, the report, and the runner against
a fake cluster (our own interface, `tulle.connectivity.cluster.ProbeCluster`, kept in memory) whose
network answers as a healthy one does unless a test breaks a path."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from tulle.connectivity import checks, runner
from tulle.connectivity.checks import (
    CLIENT_A,
    CLIENT_B,
    ECHO,
    FAIL,
    NAMESPACE,
    PASS,
    SKIP,
    ConnectivityError,
    managed_labels,
)
from tulle.connectivity.client import NoAnswer, probe
from tulle.connectivity.cluster import ClusterNode, ExecResult, ExternalTarget, NamespaceContents, PodSpec, ProbePod
from tulle.connectivity.echo import EchoServer, bound_port, open_listeners

FAST = runner.Options(timeout=0.2)
OUTSIDE_V4, OUTSIDE_V6 = "172.30.100.2", "fd30:100::2"
# A broken path: (probing pod, target pod or "outside", family, protocol) -> True when dropped.
Breakage = Callable[[str, str, int, str], bool]


class FakeCluster:
    """Pods, policies and namespaces in dictionaries; a probe's answer is what a healthy cluster
    gives (the client's own address pod to pod, its node's address outside, NetworkPolicy for
    ingress to the echo pod), less what `broken` drops."""

    name = "fake"
    probe_command = ("probe",)

    def __init__(self, nodes: int = 2, families: Sequence[int] = (4, 6), broken: Breakage | None = None) -> None:
        self._nodes = [
            ClusterNode(f"node{i}", {4: f"172.30.1.{10 + i}", 6: f"fd30:1::{10 + i:x}"}) for i in range(1, nodes + 1)
        ]
        self.families = families
        self.broken = broken or (lambda *_: False)
        self.namespaces: dict[str, dict[str, str]] = {}
        self.pods: dict[tuple[str, str], tuple[PodSpec | None, ProbePod | None]] = {}
        self.policies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.calls: list[str] = []
        self.on_apply: Callable[[Mapping[str, Any]], None] = lambda _p: None
        self.fail_start: str = ""
        self.closed = False

    # -- the interface ---------------------------------------------------------------------------

    def nodes(self) -> list[ClusterNode]:
        return list(self._nodes)

    def namespace(self, name: str) -> NamespaceContents:
        return NamespaceContents(
            labels=self.namespaces.get(name),
            pods={n: dict(s.labels) if s else None for (ns, n), (s, _) in self.pods.items() if ns == name},
            policies={n: dict(p["metadata"].get("labels", {})) for (ns, n), p in self.policies.items() if ns == name},
        )

    def create_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        self.calls.append(f"create namespace {name}")
        self.namespaces[name] = dict(labels)

    def delete_namespace(self, name: str) -> None:
        self.calls.append(f"delete namespace {name}")
        self.namespaces.pop(name, None)
        for key in [k for k in self.pods if k[0] == name]:
            del self.pods[key]
        for key in [k for k in self.policies if k[0] == name]:
            del self.policies[key]

    def start_pod(self, spec: PodSpec) -> ProbePod:
        self.calls.append(f"start pod {spec.name}")
        if spec.name == self.fail_start:
            raise RuntimeError("CNI ADD failed: try again later")
        index = len(self.pods) + 1
        addresses = {4: f"10.244.0.{index}", 6: f"fd00:10:244::{index:x}"}
        pod = ProbePod(spec.namespace, spec.name, spec.node, tuple(addresses[f] for f in self.families))
        self.pods[(spec.namespace, spec.name)] = (spec, pod)
        return pod

    def exec(self, pod: ProbePod, argv: Sequence[str], timeout: float) -> ExecResult:
        assert tuple(argv[:1]) == self.probe_command, argv
        address, port, protocol = argv[1], int(argv[2]), argv[3].upper()
        family = ipaddress.ip_address(address).version
        target = self._target(address)
        if target is None or self.broken(pod.name, target, family, protocol):
            return ExecResult(1, "", "timed out after 1 s\n")
        if target == "outside":
            node = next(n for n in self._nodes if n.name == pod.node)
            return ExecResult(0, node.addresses[family] + "\n", "")
        if not self._policy_allows(pod, target, protocol, port):
            return ExecResult(1, "", "timed out after 1 s\n")
        return ExecResult(0, f"{pod.address(family)}\n", "")

    def delete_pod(self, namespace: str, name: str) -> None:
        self.calls.append(f"delete pod {name}")
        self.pods.pop((namespace, name), None)

    def apply_policy(self, policy: Mapping[str, Any]) -> None:
        self.calls.append(f"apply policy {policy['metadata']['name']}")
        self.policies[(policy["metadata"]["namespace"], policy["metadata"]["name"])] = policy
        self.on_apply(policy)

    def delete_policy(self, namespace: str, name: str) -> None:
        self.calls.append(f"delete policy {name}")
        self.policies.pop((namespace, name), None)

    def external_target(self) -> ExternalTarget | None:
        return ExternalTarget({4: (OUTSIDE_V4, 4000), 6: (OUTSIDE_V6, 4000)}, "ext")

    def close(self) -> None:
        self.closed = True

    # -- the fake network ---------------------------------------------------------------------------

    def _target(self, address: str) -> str | None:
        if address in (OUTSIDE_V4, OUTSIDE_V6):
            return "outside"
        return next((p.name for _, p in self.pods.values() if p and address in p.addresses), None)

    def _policy_allows(self, source: ProbePod, target: str, protocol: str, port: int) -> bool:
        """Ingress NetworkPolicy as far as the test's two policies need it."""

        def matches(selector: Mapping[str, Any], pod: str) -> bool:
            spec = self.pods[(source.namespace, pod)][0]
            labels = dict(spec.labels) if spec else {}
            return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

        selecting = [p for p in self.policies.values() if matches(p["spec"]["podSelector"], target)]
        rules = [rule for p in selecting for rule in p["spec"].get("ingress", [])]
        return not selecting or any(
            any(matches(peer["podSelector"], source.name) for peer in rule.get("from", []))
            and {"protocol": protocol, "port": port} in rule.get("ports", [])
            for rule in rules
        )

    def left(self) -> list[str]:
        return (
            [f"namespace {n}" for n in self.namespaces]
            + [f"pod {k[1]}" for k in self.pods]
            + [f"policy {k[1]}" for k in self.policies]
        )


def run(cluster: FakeCluster, options: runner.Options = FAST, stopping: threading.Event | None = None) -> checks.Report:
    return runner.run(cluster, options, stopping or threading.Event())


def by_group(report: checks.Report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in report.results:
        out.setdefault(r.check.group, set()).add(r.status)
    return out


# -- the runner against the fake -----------------------------------------------------------------------


def test_a_healthy_cluster_passes_every_check_and_nothing_is_left() -> None:
    cluster = FakeCluster()
    report = run(cluster)
    assert report.exit_code == 0
    assert [r.status for r in report.results] == [PASS] * 32 == [PASS] * report.planned
    assert cluster.left() == []
    # the pods are deleted after their policies, the namespace last
    assert cluster.calls[-1] == f"delete namespace {NAMESPACE}"


def test_a_dropped_path_fails_its_checks_with_the_reason_and_a_nonzero_exit() -> None:
    across = FakeCluster(broken=lambda src, target, _f, _p: src == CLIENT_B and target == ECHO)
    report = run(across)
    assert report.exit_code == 1
    failed = [r for r in report.results if r.status == FAIL]
    assert {r.check.group for r in failed} == {
        "pod to pod, across nodes",
        "allow policy: the allowed peer gets through",
    }
    assert len(failed) == 8
    assert all(r.reason.startswith("no answer: timed out after 1 s (tried for") for r in failed)
    assert all(r.seconds >= FAST.timeout for r in failed)  # it waited for the path to heal
    assert by_group(report)["pod to pod, same node"] == {PASS}
    assert across.left() == []


def test_traffic_that_is_not_masqueraded_fails_the_outside_check() -> None:
    class NoMasquerade(FakeCluster):
        def exec(self, pod: ProbePod, argv: Sequence[str], timeout: float) -> ExecResult:
            got = super().exec(pod, argv, timeout)
            if argv[1] in (OUTSIDE_V4, OUTSIDE_V6):
                return ExecResult(0, f"{pod.address(ipaddress.ip_address(argv[1]).version)}\n", "")
            return got

    report = run(NoMasquerade())
    outside = [r for r in report.results if r.check.target == checks.OUTSIDE]
    assert len(outside) == 8 and {r.status for r in outside} == {FAIL}
    assert "where it should see 172.30.1.11 (node1's address: traffic leaving the cluster is masqueraded)" in (
        outside[0].reason
    )


def test_a_policy_that_is_not_enforced_fails_the_policy_checks() -> None:
    class NoPolicy(FakeCluster):
        def _policy_allows(self, source: ProbePod, target: str, protocol: str, port: int) -> bool:
            return True

    report = run(NoPolicy())
    groups = by_group(report)
    assert groups["default deny: ingress blocked"] == {FAIL}
    assert groups["allow policy: no other peer does"] == {FAIL}
    assert groups["allow policy: the allowed peer gets through"] == {PASS}
    deny = next(r for r in report.results if r.check.group == "default deny: ingress blocked")
    assert deny.reason.startswith("answered (it saw 10.244.0.") and "should be blocked" in deny.reason


def test_a_probe_that_does_not_run_fails_even_a_check_that_expects_a_block() -> None:
    class NoProbeTool(FakeCluster):
        def exec(self, pod: ProbePod, argv: Sequence[str], timeout: float) -> ExecResult:
            return ExecResult(127, "", "nsenter: failed to execute probe: No such file or directory\n")

    report = run(NoProbeTool())
    assert {r.status for r in report.results} == {FAIL}
    assert report.results[-1].reason.startswith("the probe did not run (exit 127): nsenter: failed to execute probe")


def test_an_interrupted_run_stops_between_steps_and_removes_its_policies_pods_and_namespace() -> None:
    stopping = threading.Event()
    allowed = threading.Event()
    # Interrupted while the allow policy's checks wait for it to take effect (it never does here).
    cluster = FakeCluster(broken=lambda src, target, _f, _p: allowed.is_set() and src == CLIENT_B)

    def interrupt(policy: Mapping[str, Any]) -> None:
        if policy["metadata"]["name"] == checks.ALLOW_POLICY:
            allowed.set()
            threading.Timer(0.1, stopping.set).start()

    cluster.on_apply = interrupt
    report = run(cluster, runner.Options(timeout=30), stopping=stopping)
    assert report.interrupted and report.exit_code == 130
    assert len(report.results) < report.planned == 32
    assert {r.check.group for r in report.results} <= {"pod to pod, same node", "pod to pod, across nodes"} | {
        "pod to outside (masquerade)",
        "default deny: ingress blocked",
    }
    assert "delete policy allow-client-b" in cluster.calls
    assert cluster.left() == []
    assert checks.summary(report).startswith(f"interrupted after {len(report.results)} of 32 checks")


def test_leftovers_of_an_earlier_run_are_removed_before_the_run() -> None:
    cluster = FakeCluster()
    cluster.namespaces[NAMESPACE] = managed_labels()
    cluster.pods[(NAMESPACE, ECHO)] = (PodSpec(NAMESPACE, ECHO, "node1", managed_labels(ECHO)), None)
    cluster.pods[(NAMESPACE, CLIENT_A)] = (None, None)  # an add cut short: no Pod object yet
    cluster.apply_policy(checks.deny_policy(NAMESPACE))
    cluster.calls.clear()
    report = run(cluster)
    assert report.exit_code == 0
    # policies first (the pods' traffic is not judged by half a policy set), pods side by side, namespace last
    assert cluster.calls[0] == "delete policy default-deny-ingress"
    assert set(cluster.calls[1:3]) == {"delete pod echo", "delete pod client-a"}
    assert cluster.calls[3] == f"delete namespace {NAMESPACE}"
    assert cluster.left() == []


@pytest.mark.parametrize(
    ("namespace_labels", "pod_labels", "says"),
    [
        ({"team": "web"}, None, "namespace tulle-connectivity exists and was not made by `tulle connectivity test`"),
        (managed_labels(), {"app": "mine"}, "holds what `tulle connectivity test` did not make (pod mine)"),
    ],
)
def test_a_namespace_holding_what_the_test_did_not_make_is_refused_and_left_alone(
    namespace_labels: dict[str, str], pod_labels: dict[str, str] | None, says: str
) -> None:
    cluster = FakeCluster()
    cluster.namespaces[NAMESPACE] = namespace_labels
    if pod_labels is not None:
        cluster.pods[(NAMESPACE, "mine")] = (PodSpec(NAMESPACE, "mine", "node1", pod_labels), None)
    before = cluster.left()
    with pytest.raises(ConnectivityError, match=says.replace("(", r"\(").replace(")", r"\)")):
        run(cluster)
    assert cluster.calls == [] and cluster.left() == before


def test_a_pod_that_does_not_start_stops_the_run_named_and_the_others_are_removed() -> None:
    cluster = FakeCluster()
    cluster.fail_start = CLIENT_B
    with pytest.raises(ConnectivityError, match="probe pod client-b did not start on node2: CNI ADD failed"):
        run(cluster)
    assert cluster.left() == []


def test_one_node_and_ipv4_only_skip_what_they_cannot_check() -> None:
    report = run(FakeCluster(nodes=1, families=(4,)))
    assert report.exit_code == 0
    skipped = {(r.check.group, r.check.family, r.reason) for r in report.results if r.status == SKIP}
    assert ("pod to pod, same node", 6, "no IPv6") in skipped
    assert ("pod to pod, across nodes", 4, "one node") in skipped
    assert ("pod to outside (masquerade)", 6, "no IPv6") in skipped
    assert {r.status for r in report.results if r.check.family == 4 and r.check.source_node == "node1"} >= {PASS}
    assert checks.summary(report).startswith(f"all {report.count(PASS)} checks passed ({report.count(SKIP)} skipped)")


# -- the pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "error"),
    [
        (["node1", "node2", "node1"], "--node: give one or two nodes, not 3"),
        (["node2", "node2"], "--node node2: given twice"),
        (["nodeX"], "--node nodeX: no such node (nodes: node1, node2)"),
    ],
)
def test_bad_node_choices_are_refused_with_the_field_and_the_reason(wanted: list[str], error: str) -> None:
    cluster = FakeCluster()
    with pytest.raises(ConnectivityError, match=error.replace("(", r"\(").replace(")", r"\)")):
        runner.run(cluster, runner.Options(nodes=wanted), threading.Event())
    assert cluster.calls == []


def test_the_plan_covers_both_families_both_protocols_and_the_policies() -> None:
    cluster = FakeCluster()
    pods = {s.name: cluster.start_pod(s) for s in checks.pod_specs(NAMESPACE, *cluster.nodes())}
    steps = checks.plan(pods, {n.name: n for n in cluster.nodes()}, cluster.external_target())
    assert [len(s.checks) for s in steps] == [16, 8, 4, 4]
    assert [p["metadata"]["name"] for s in steps for p in s.apply] == [checks.DENY_POLICY, checks.ALLOW_POLICY]
    every = [c for s in steps for c in s.checks]
    assert {(c.family, c.protocol) for c in every} == {(4, "TCP"), (4, "UDP"), (6, "TCP"), (6, "UDP")}
    across = [c for c in every if c.group == "pod to pod, across nodes"]
    assert {(c.source_node, c.target_node) for c in across} == {("node2", "node1")}
    assert all(c.expected_source == pods[CLIENT_B].address(c.family) for c in across)
    # only the check that follows an enforced policy is tried once
    assert [c.group for c in every if not c.wait] == ["allow policy: no other peer does"] * 4
    allow = steps[2].apply[0]
    assert allow["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {checks.NAME_LABEL: CLIENT_B}}}]


def test_report_lines_line_up_and_json_says_the_same() -> None:
    report = run(FakeCluster(nodes=1, families=(4,)))
    steps_widths = (
        max(len(r.check.group) for r in report.results),
        max(len(r.check.path) for r in report.results),
    )
    lines = [checks.format_result(r, steps_widths) for r in report.results]
    assert len({line.index("IPv") for line in lines}) == 1
    data = checks.report_json(report)
    assert data["passed"] == report.count(PASS) and data["skipped"] == report.count(SKIP) and data["failed"] == 0
    assert data["checks"][0]["from"] == {"pod": CLIENT_A, "node": "node1"}


# -- the probe's two ends, on loopback ----------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_the_echo_server_answers_with_the_address_it_saw(family: int, protocol: str) -> None:
    listeners = open_listeners(0, [family])
    server = EchoServer(listeners)
    server.start()
    loopback = "127.0.0.1" if family == 4 else "::1"
    try:
        assert probe(loopback, bound_port(listeners, family), protocol, timeout=2.0) == loopback
    finally:
        server.stop()
    assert all(s.fileno() == -1 for s in listeners)


def test_the_client_says_why_when_nothing_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(NoAnswer, match="connection refused"):
            probe("127.0.0.1", port, "tcp", timeout=1.0)
