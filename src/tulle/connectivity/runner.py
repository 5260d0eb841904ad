"""Run the connectivity checks against a cluster, and leave nothing behind.

Order: refuse (changing nothing) when the namespace holds what the test did not make; remove what
an earlier run left; make the namespace and the probe pods; run each step's checks side by side;
then, whatever happened, delete the policies, the pods and the namespace.

An interruption is a `threading.Event` the caller sets (from its SIGINT and SIGTERM handlers): it
is looked at between steps and between the tries of a check, never in the middle of a cluster
call, so that no pod or policy is left half made; the clean-up then runs to its end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tulle.connectivity.checks import (
    FAIL,
    NAMESPACE,
    PASS,
    SKIP,
    Check,
    CheckResult,
    ConnectivityError,
    Leftovers,
    Report,
    Step,
    choose_nodes,
    judge,
    leftovers,
    managed_labels,
    plan,
    pod_specs,
    probe_argv,
    refusal,
)
from tulle.connectivity.cluster import ClusterNode, PodSpec, ProbeCluster, ProbePod

RETRY_INTERVAL = 0.3
EXEC_SLACK = 15.0  # beyond a try's own timeout: starting the probe command in the pod
MAX_PARALLEL_PROBES = 8


@dataclass(frozen=True)
class Options:
    namespace: str = NAMESPACE
    nodes: Sequence[str] = ()
    timeout: float = 10.0  # how long a check waits for routes or a policy to take effect
    attempt_timeout: float = 1.0  # how long one try waits for an answer


def run(
    cluster: ProbeCluster,
    options: Options,
    stopping: threading.Event,
    report: Callable[[CheckResult], None] = lambda _r: None,
    progress: Callable[[str], None] = lambda _m: None,
    planned_steps: Callable[[list[Step]], None] = lambda _s: None,
) -> Report:
    """Run every check; `planned_steps` hears the plan once the pods are up, `report` each result
    as its step ends, `progress` what is being done.

    Raises ConnectivityError for what keeps the test from running (after cleaning up what it made)."""
    started = time.monotonic()
    ns = options.namespace
    nodes = cluster.nodes()
    first, second = choose_nodes(nodes, options.nodes)
    found = leftovers(ns, cluster.namespace(ns))
    if found.foreign:
        raise ConnectivityError(refusal(ns, found))
    work = _Run(cluster, options, stopping, report, progress)
    try:
        if not found.empty:
            progress(f"removing what an earlier run left in namespace {ns}")
            _remove(cluster, ns, found)
        work.steps(nodes, first, second, planned_steps)
    except _Stop:
        progress("interrupted: cleaning up")
    except BaseException:
        problem = _clean_up(cluster, ns, progress)
        if problem:
            progress(problem)
        raise
    problem = _clean_up(cluster, ns, progress)
    if problem:
        raise ConnectivityError(problem)
    return Report(
        cluster=cluster.name,
        namespace=ns,
        nodes=(first.name, second.name),
        results=tuple(work.results),
        planned=work.planned,
        seconds=time.monotonic() - started,
        interrupted=stopping.is_set(),
    )


class _Stop(Exception):
    """The run was interrupted: stop here and clean up."""


class _Run:
    """The part of a run that makes things: the namespace, the pods, the policies, the probes."""

    def __init__(
        self,
        cluster: ProbeCluster,
        options: Options,
        stopping: threading.Event,
        report: Callable[[CheckResult], None],
        progress: Callable[[str], None],
    ) -> None:
        self.cluster, self.options, self.stopping = cluster, options, stopping
        self.report, self.progress = report, progress
        self.results: list[CheckResult] = []
        self.planned = 0

    def _checkpoint(self) -> None:
        if self.stopping.is_set():
            raise _Stop

    def steps(
        self,
        nodes: Sequence[ClusterNode],
        first: ClusterNode,
        second: ClusterNode,
        planned_steps: Callable[[list[Step]], None],
    ) -> None:
        cluster, ns = self.cluster, self.options.namespace
        self._checkpoint()
        self.progress(f"starting probe pods in namespace {ns} on {first.name} and {second.name}")
        cluster.create_namespace(ns, managed_labels())
        pods = _start_pods(cluster, pod_specs(ns, first, second))
        steps = plan(pods, {n.name: n for n in nodes}, cluster.external_target(), ns)
        self.planned = sum(len(s.checks) for s in steps)
        planned_steps(steps)
        for step in steps:
            self._checkpoint()
            self.progress(step.title)
            for policy in step.apply:
                cluster.apply_policy(policy)
            step_results = _run_step(cluster, step, pods, self.options, self.stopping)
            for result in step_results:
                self.report(result)
            self.results += step_results
            if len(step_results) < len(step.checks):
                raise _Stop


def _start_pods(cluster: ProbeCluster, specs: Sequence[PodSpec]) -> dict[str, ProbePod]:
    """Start the pods side by side; a pod that does not start stops the run, named."""
    with ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="probe pod") as pool:
        futures = [(spec, pool.submit(cluster.start_pod, spec)) for spec in specs]
        pods: dict[str, ProbePod] = {}
        errors: list[str] = []
        for spec, future in futures:
            try:
                pods[spec.name] = future.result()
            except Exception as exc:
                errors.append(f"probe pod {spec.name} did not start on {spec.node}: {exc}")
    if errors:
        raise ConnectivityError("; ".join(errors))
    return pods


def _run_step(
    cluster: ProbeCluster, step: Step, pods: Mapping[str, ProbePod], options: Options, stopping: threading.Event
) -> list[CheckResult]:
    """The step's results in its order; those cut short by an interruption are left out."""
    checks = step.checks
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PROBES, len(checks)), thread_name_prefix="probe") as pool:
        futures = [pool.submit(_run_check, cluster, c, pods[c.source], options, stopping) for c in checks]
        done = [f.result() for f in futures]
    return [r for r in done if r is not None]


def _run_check(
    cluster: ProbeCluster, check: Check, pod: ProbePod, options: Options, stopping: threading.Event
) -> CheckResult | None:
    if check.skip:
        return CheckResult(check, SKIP, 0.0, check.skip)
    started = time.monotonic()
    deadline = started + (options.timeout if check.wait else 0.0)
    argv = probe_argv(cluster.probe_command, check, options.attempt_timeout)
    while True:
        try:
            ok, why = judge(check, cluster.exec(pod, argv, options.attempt_timeout + EXEC_SLACK))
        except Exception as exc:  # the cluster could not run the probe: a failed try, said as such
            ok, why = False, f"the probe did not run: {exc}"
        took = time.monotonic() - started
        if ok:
            return CheckResult(check, PASS, took)
        if time.monotonic() >= deadline:
            waited = f" (tried for {took:.0f} s)" if check.wait else ""
            return CheckResult(check, FAIL, took, why + waited)
        if stopping.wait(RETRY_INTERVAL):
            return None


def _remove(cluster: ProbeCluster, namespace: str, found: Leftovers) -> None:
    """Delete what the test made: its policies, its pods (side by side), then its namespace."""
    for policy in found.policies:
        cluster.delete_policy(namespace, policy)
    if found.pods:
        with ThreadPoolExecutor(max_workers=len(found.pods), thread_name_prefix="probe pod") as pool:
            for future in [pool.submit(cluster.delete_pod, namespace, pod) for pod in found.pods]:
                future.result()
    if found.namespace:
        cluster.delete_namespace(namespace)


def _clean_up(cluster: ProbeCluster, namespace: str, progress: Callable[[str], None]) -> str:
    """Remove everything of the test's in the namespace; '' when done, else what is left and why."""
    progress(f"cleaning up namespace {namespace}")
    try:
        found = leftovers(namespace, cluster.namespace(namespace))
        _remove(cluster, namespace, found)
    except Exception as exc:
        return f"cleaning up namespace {namespace} failed: {exc}; the next run removes what is left"
    if found.foreign:
        held = ", ".join(found.foreign)
        return f"namespace {namespace} was left in place: it now holds {held}, which the test did not make"
    return ""
