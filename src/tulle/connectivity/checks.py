"""What `tulle connectivity test` checks and how its results read: plain data in, plain data out.

Three probe pods in a namespace of the test's own: `echo` (serves TCP and UDP) and `client-a` on a
first node, `client-b` on a second. The checks, each once per family the pods have and per
protocol:
- pod to pod on the same node and across nodes, the server seeing the client's own address;
- pod to a server outside the cluster, which must see the node's address (masquerade);
- a default-deny ingress policy blocks both clients; an allow policy for client-b lets it through
  and no one else.

A check that expects traffic to pass is tried until it does or its deadline passes (a new pod's
routes and a new policy take a moment to reach every node); one that expects traffic to be blocked
is tried until it is when it waits for a policy to be enforced, and once when the policy already is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tulle.connectivity.cluster import ClusterNode, ExecResult, ExternalTarget, NamespaceContents, PodSpec, ProbePod

NAMESPACE = "tulle-connectivity"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "tulle-connectivity"
NAME_LABEL = "app.kubernetes.io/name"
ECHO_PORT = 8080
FAMILIES = (4, 6)
PROTOCOLS = ("TCP", "UDP")
ECHO, CLIENT_A, CLIENT_B = "echo", "client-a", "client-b"
OUTSIDE = "outside"
DENY_POLICY, ALLOW_POLICY = "default-deny-ingress", "allow-client-b"

PASS, FAIL, SKIP = "pass", "fail", "skip"


class ConnectivityError(Exception):
    """Something that keeps the test from running (a bad --node, a namespace it did not make)."""


@dataclass(frozen=True)
class Check:
    """One probe from a pod to a target, and what must come of it."""

    group: str  # what is checked, e.g. "pod to pod, across nodes"
    family: int
    protocol: str  # "TCP" or "UDP"
    source: str  # the probing pod
    source_node: str
    target: str  # a probe pod's name, or OUTSIDE
    target_node: str  # for OUTSIDE, what the outside is
    address: str  # "" when skipped
    port: int
    expect_reach: bool
    expected_source: str | None = None  # the address the server must see, when it must be reached
    expected_source_is: str = ""  # what that address is, for the report
    wait: bool = True  # try until the expectation holds or the deadline passes
    skip: str = ""  # why the check is not run ("" when it is)

    @property
    def path(self) -> str:
        return f"{self.source} ({self.source_node}) -> {self.target} ({self.target_node})"


@dataclass(frozen=True)
class Step:
    """Policies to apply, then checks to run side by side."""

    title: str
    apply: tuple[Mapping[str, Any], ...]
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class CheckResult:
    check: Check
    status: str  # PASS, FAIL or SKIP
    seconds: float
    reason: str = ""


# -- pods and policies ----------------------------------------------------------------------------


def choose_nodes(nodes: Sequence[ClusterNode], wanted: Sequence[str]) -> tuple[ClusterNode, ClusterNode]:
    """The node for the echo pod and client-a, and the node for client-b: the ones asked for with
    --node (one or two), else the first two; with a one-node cluster, that node twice.

    >>> n = [ClusterNode("node1", {}), ClusterNode("node2", {})]
    >>> [x.name for x in choose_nodes(n, [])], [x.name for x in choose_nodes(n, ["node2"])]
    (['node1', 'node2'], ['node2', 'node1'])
    >>> choose_nodes(n, ["node3"])
    Traceback (most recent call last):
    ...
    tulle.connectivity.checks.ConnectivityError: --node node3: no such node (nodes: node1, node2)
    """
    if not nodes:
        raise ConnectivityError("the cluster has no nodes to start probe pods on")
    by_name = {n.name: n for n in nodes}
    if len(wanted) > 2:
        raise ConnectivityError(f"--node: give one or two nodes, not {len(wanted)}")
    for name in wanted:
        if name not in by_name:
            raise ConnectivityError(f"--node {name}: no such node (nodes: {', '.join(by_name)})")
    if len(wanted) == 2 and wanted[0] == wanted[1]:
        raise ConnectivityError(f"--node {wanted[1]}: given twice; give two different nodes, or one")
    first = by_name[wanted[0]] if wanted else nodes[0]
    others = [n for n in nodes if n.name != first.name]
    second = by_name[wanted[1]] if len(wanted) == 2 else (others[0] if others else first)
    return first, second


def managed_labels(name: str | None = None) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY}
    if name is not None:
        labels[NAME_LABEL] = name
    return labels


def pod_specs(namespace: str, first: ClusterNode, second: ClusterNode, port: int = ECHO_PORT) -> list[PodSpec]:
    return [
        PodSpec(namespace, ECHO, first.name, managed_labels(ECHO), serve_port=port),
        PodSpec(namespace, CLIENT_A, first.name, managed_labels(CLIENT_A)),
        PodSpec(namespace, CLIENT_B, second.name, managed_labels(CLIENT_B)),
    ]


def deny_policy(namespace: str) -> dict[str, Any]:
    """Every pod of the namespace accepts no new connection from anywhere."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": DENY_POLICY, "namespace": namespace, "labels": managed_labels()},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }


def allow_policy(namespace: str, port: int = ECHO_PORT) -> dict[str, Any]:
    """The echo pod accepts client-b on its port, TCP and UDP (and, with the deny policy, no one else)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": ALLOW_POLICY, "namespace": namespace, "labels": managed_labels()},
        "spec": {
            "podSelector": {"matchLabels": {NAME_LABEL: ECHO}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {NAME_LABEL: CLIENT_B}}}],
                    "ports": [{"protocol": p, "port": port} for p in PROTOCOLS],
                }
            ],
        },
    }


# -- the plan -------------------------------------------------------------------------------------


def _family_skip(family: int, *pods: ProbePod) -> str:
    return "" if all(p.address(family) for p in pods) else f"no IPv{family}"


def _to_pod(
    group: str,
    client: ProbePod,
    echo: ProbePod,
    family: int,
    protocol: str,
    port: int,
    *,
    expect_reach: bool = True,
    wait: bool = True,
    skip: str = "",
) -> Check:
    return Check(
        group=group,
        family=family,
        protocol=protocol,
        source=client.name,
        source_node=client.node,
        target=echo.name,
        target_node=echo.node,
        address=echo.address(family) or "",
        port=port,
        expect_reach=expect_reach,
        expected_source=client.address(family) if expect_reach else None,
        expected_source_is="the client pod's own address: pod to pod is not translated",
        wait=wait,
        skip=skip or _family_skip(family, client, echo),
    )


def _to_outside(
    client: ProbePod, node: ClusterNode, external: ExternalTarget | None, family: int, protocol: str, skip: str
) -> Check:
    endpoint = external.endpoints.get(family) if external else None
    if not skip:
        skip = _family_skip(family, client)
    if not skip and external is None:
        skip = "the cluster has no outside target"
    elif not skip and endpoint is None:
        skip = f"the outside target has no IPv{family} address"
    elif not skip and family not in node.addresses:
        skip = f"{node.name} has no IPv{family} address"
    return Check(
        group="pod to outside (masquerade)",
        family=family,
        protocol=protocol,
        source=client.name,
        source_node=client.node,
        target=OUTSIDE,
        target_node=external.description if external else "none",
        address=endpoint[0] if endpoint else "",
        port=endpoint[1] if endpoint else 0,
        expect_reach=True,
        expected_source=node.addresses.get(family),
        expected_source_is=f"{node.name}'s address: traffic leaving the cluster is masqueraded",
        skip=skip,
    )


def plan(
    pods: Mapping[str, ProbePod],
    nodes: Mapping[str, ClusterNode],
    external: ExternalTarget | None,
    namespace: str = NAMESPACE,
    port: int = ECHO_PORT,
) -> list[Step]:
    """The steps of a run, given the started pods (by name), the nodes and the outside target."""
    echo, a, b = pods[ECHO], pods[CLIENT_A], pods[CLIENT_B]
    one_node = "" if b.node != echo.node else "one node"
    grid = [(family, protocol) for family in FAMILIES for protocol in PROTOCOLS]
    reach: list[Check] = []
    reach += [_to_pod("pod to pod, same node", a, echo, f, p, port) for f, p in grid]
    reach += [_to_pod("pod to pod, across nodes", b, echo, f, p, port, skip=one_node) for f, p in grid]
    reach += [_to_outside(a, nodes[a.node], external, f, p, "") for f, p in grid]
    reach += [_to_outside(b, nodes[b.node], external, f, p, one_node) for f, p in grid]
    denied = "default deny: ingress blocked"
    deny = [_to_pod(denied, c, echo, f, p, port, expect_reach=False) for c in (a, b) for f, p in grid]
    allowed = [_to_pod("allow policy: the allowed peer gets through", b, echo, f, p, port) for f, p in grid]
    # Once client-b gets through, the allow policy is in force: one try each shows it is the only one.
    others = [
        _to_pod("allow policy: no other peer does", a, echo, f, p, port, expect_reach=False, wait=False)
        for f, p in grid
    ]
    return [
        Step("connectivity", (), tuple(reach)),
        Step("a default-deny ingress policy", (deny_policy(namespace),), tuple(deny)),
        Step("an allow policy for client-b", (allow_policy(namespace, port),), tuple(allowed)),
        Step("no one else gets through", (), tuple(others)),
    ]


def probe_argv(command: Sequence[str], check: Check, attempt_timeout: float) -> list[str]:
    """The command line of one try of a check, in the probing pod."""
    return [*command, check.address, str(check.port), check.protocol.lower(), "--timeout", f"{attempt_timeout:g}"]


# -- verdicts -------------------------------------------------------------------------------------

EXIT_OK, EXIT_NO_ANSWER = 0, 1


def judge(check: Check, result: ExecResult) -> tuple[bool, str]:
    """Whether one try met the check's expectation, and if not, why not.

    >>> c = Check("g", 4, "TCP", "a", "n1", "echo", "n1", "10.0.0.2", 80, True, "10.0.0.1", "the pod's")
    >>> judge(c, ExecResult(0, "10.0.0.1\\n", ""))
    (True, '')
    >>> judge(c, ExecResult(0, "172.30.1.11\\n", ""))
    (False, "answered, but saw 172.30.1.11 where it should see 10.0.0.1 (the pod's)")
    >>> judge(c, ExecResult(1, "", "connection refused\\n"))
    (False, 'no answer: connection refused')
    """
    seen = result.stdout.strip()
    if result.exit_code == EXIT_OK:
        if not check.expect_reach:
            return False, f"answered (it saw {seen}): the traffic should be blocked"
        if check.expected_source and seen != check.expected_source:
            return (
                False,
                f"answered, but saw {seen} where it should see {check.expected_source} ({check.expected_source_is})",
            )
        return True, ""
    if result.exit_code == EXIT_NO_ANSWER:
        return (not check.expect_reach), f"no answer: {_last_line(result.stderr) or 'no reason given'}"
    # The probe did not run: that proves nothing either way, so it fails a check that expects a block too.
    return False, f"the probe did not run (exit {result.exit_code}): {_last_line(result.stderr) or 'no output'}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- leftovers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leftovers:
    """What an earlier run left in the namespace (to delete), and what the test did not make (to
    leave alone, and a reason to refuse to run)."""

    pods: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    namespace: bool = False  # the namespace is the test's and nothing else is in it
    foreign: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.pods or self.policies or self.namespace)


def _ours(labels: Mapping[str, str] | None) -> bool:
    return labels is not None and labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def leftovers(name: str, contents: NamespaceContents) -> Leftovers:
    """Sort what is in the namespace into the test's own and the rest.

    A namespace the test did not make is not touched at all; in its own, a pod without a Pod object
    is an add of the test's that was cut short.

    >>> leftovers("t", NamespaceContents({MANAGED_BY_LABEL: MANAGED_BY}, {"echo": None, "web": {}}))
    Leftovers(pods=('echo',), policies=(), namespace=False, foreign=('pod web',))
    >>> leftovers("t", NamespaceContents({}, {"echo": managed_labels("echo")})).foreign
    ('namespace t',)
    """
    if contents.labels is not None and not _ours(contents.labels):
        return Leftovers(foreign=(f"namespace {name}",))
    ours_known = contents.labels is not None
    pods = [p for p, labels in sorted(contents.pods.items()) if _ours(labels) or (labels is None and ours_known)]
    policies = [p for p, labels in sorted(contents.policies.items()) if _ours(labels)]
    foreign = [f"pod {p}" for p in sorted(contents.pods) if p not in pods]
    foreign += [f"networkpolicy {p}" for p in sorted(contents.policies) if p not in policies]
    return Leftovers(tuple(pods), tuple(policies), ours_known and not foreign, tuple(foreign))


def refusal(name: str, found: Leftovers) -> str:
    """The one line that says why the test will not run in the namespace."""
    what = ", ".join(found.foreign)
    if found.foreign == (f"namespace {name}",):
        return (
            f"namespace {name} exists and was not made by `tulle connectivity test` (it lacks the label "
            f"{MANAGED_BY_LABEL}={MANAGED_BY}); nothing was changed: delete it, or name another with --namespace"
        )
    return (
        f"namespace {name} holds what `tulle connectivity test` did not make ({what}); nothing was changed: "
        f"delete those, or name another namespace with --namespace"
    )


# -- the report -----------------------------------------------------------------------------------

_WORD = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP"}


def column_widths(steps: Sequence[Step]) -> tuple[int, int]:
    checks = [c for s in steps for c in s.checks]
    return max((len(c.group) for c in checks), default=0), max((len(c.path) for c in checks), default=0)


def format_result(result: CheckResult, widths: tuple[int, int] = (0, 0)) -> str:
    """One line per check: verdict, what, family and protocol, from and to, time, and why.

    >>> c = Check("pod to pod, same node", 6, "UDP", "client-a", "node1", "echo", "node1", "", 8080, True)
    >>> format_result(CheckResult(c, SKIP, 0.0, "no IPv6"))
    'SKIP  pod to pod, same node  IPv6 UDP  client-a (node1) -> echo (node1)  skipped: no IPv6'
    >>> format_result(CheckResult(c, FAIL, 10.04, "no answer: timed out"))
    'FAIL  pod to pod, same node  IPv6 UDP  client-a (node1) -> echo (node1)  10.0 s  no answer: timed out'
    """
    check = result.check
    head = (
        f"{_WORD[result.status]}  {check.group.ljust(widths[0])}  IPv{check.family} {check.protocol.ljust(3)}  "
        f"{check.path.ljust(widths[1])}"
    )
    if result.status == SKIP:
        return f"{head}  skipped: {result.reason}"
    line = f"{head}  {result.seconds:4.1f} s"
    return f"{line}  {result.reason}" if result.reason else line


@dataclass(frozen=True)
class Report:
    cluster: str
    namespace: str
    nodes: tuple[str, ...]
    results: tuple[CheckResult, ...]
    planned: int  # checks in the plan (0 when the run stopped before it was made)
    seconds: float
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def exit_code(self) -> int:
        """0 when every check run passed; 1 when one failed; 130 when the run was interrupted."""
        if self.interrupted:
            return 130
        return 1 if self.count(FAIL) else 0


def summary(report: Report) -> str:
    """The last line of a report.

    >>> c = Check("g", 4, "TCP", "a", "n1", "echo", "n1", "10.0.0.2", 80, True)
    >>> summary(Report("lab x", "t", ("n1",), (CheckResult(c, PASS, 0.1), CheckResult(c, SKIP, 0)), 2, 7.25))
    'all 1 checks passed (1 skipped) in 7.2 s'
    >>> summary(Report("lab x", "t", ("n1",), (CheckResult(c, FAIL, 3.0, "x"),), 2, 9.0, interrupted=True))
    'interrupted after 1 of 2 checks: 1 FAILED, 0 passed, 0 skipped in 9.0 s'
    """
    passed, failed, skipped = report.count(PASS), report.count(FAIL), report.count(SKIP)
    took = f"in {report.seconds:.1f} s"
    if report.interrupted:
        done = f"{len(report.results)} of {report.planned} checks"
        return f"interrupted after {done}: {failed} FAILED, {passed} passed, {skipped} skipped {took}"
    if failed:
        return f"{failed} of {passed + failed} checks FAILED ({passed} passed, {skipped} skipped) {took}"
    extra = f" ({skipped} skipped)" if skipped else ""
    return f"all {passed} checks passed{extra} {took}"


def report_json(report: Report) -> dict[str, Any]:
    return {
        "cluster": report.cluster,
        "namespace": report.namespace,
        "nodes": list(report.nodes),
        "checks": [
            {
                "check": r.check.group,
                "family": f"IPv{r.check.family}",
                "protocol": r.check.protocol,
                "from": {"pod": r.check.source, "node": r.check.source_node},
                "to": {"pod": r.check.target, "node": r.check.target_node, "address": r.check.address},
                "port": r.check.port,
                "status": r.status,
                "seconds": round(r.seconds, 3),
                "reason": r.reason,
            }
            for r in report.results
        ],
        "passed": report.count(PASS),
        "failed": report.count(FAIL),
        "skipped": report.count(SKIP),
        "seconds": round(report.seconds, 3),
        "interrupted": report.interrupted,
    }
