"""What a node's agent publishes on its Node for readers (`model/node_report.py`): its underlay
interface, its readiness problems and each pod's last CNI failure; without root, on the
in-memory datastore with the agent's own CNI service and node controller.

Invariants:
- a CNI command the agent answers with an error, for a pod the request names, is on the
  node's Node soon after (one write for a burst), newest per pod, at most MAX_CNI_FAILURES pods;
- a request that names no valid pod, or concerns none (STATUS), records nothing;
- a report that did not change writes nothing; one that changed (a problem came) is written
  within a heartbeat.
"""

from __future__ import annotations

import dataclasses
import json
import threading

from tests.lablib import wait_until
from tests.unit.test_agent_controllers import UNDERLAY, Cluster, Cni, cluster, cni  # noqa: F401 (fixtures)
from tulle.agent.cni_failures import CniFailureLog
from tulle.agent.cni_service import CniService
from tulle.agent.controller import FULL
from tulle.agent.node_controller import NodeController
from tulle.model.kinds import NODE
from tulle.model.node_report import (
    ANNOTATION_CNI_FAILURES,
    MAX_CNI_FAILURES,
    CniFailure,
    cni_failures_of,
    last_cni_failure,
    problems_of,
    report_annotations,
    underlay_of,
    with_failure,
)


def test_a_failed_add_is_published_on_the_nodes_node_for_the_pod(cni: Cni, cluster: Cluster) -> None:  # noqa: F811
    problems = ["no IPPool is configured"]
    log = CniFailureLog()
    node = NodeController(
        cluster.ds,
        "me",
        "vxlan",
        UNDERLAY,
        lambda: [],
        cluster.informers.nodes,
        lease_ttl=2,
        report=lambda: report_annotations(UNDERLAY.ifname, problems, log.snapshot()),
    )
    log.on_change = lambda: node.enqueue(FULL)
    service = CniService(dataclasses.replace(cni.service.ctx, failed=log.record))
    node.register()
    request = cni.request("ADD", "a", "a")
    answer = service.handle(dict(request, netns="/run/netns/h10d-gone"))
    assert answer["error"]["code"] == 4, answer
    assert wait_until(lambda: FULL in node._queued)  # the node controller is asked to write it
    node.run_pending()
    stored = cluster.ds.get(NODE, "me")
    assert stored is not None
    found = last_cni_failure([stored], "web/a")
    assert found is not None
    where, failure = found
    assert (where, failure.command, failure.code) == ("me", "ADD", 4)
    assert "CNI_NETNS /run/netns/h10d-gone does not exist" in failure.message
    assert problems_of(stored) == problems and underlay_of(stored) == UNDERLAY.ifname


def test_a_request_for_no_valid_pod_or_for_the_node_records_nothing(cni: Cni) -> None:  # noqa: F811
    log = CniFailureLog()
    service = CniService(dataclasses.replace(cni.service.ctx, failed=log.record))
    bad_name = cni.request("ADD", "Not_A_Name", "c1")
    assert service.handle(bad_name)["error"]["code"] == 4
    assert service.handle({"command": "STATUS", "config": {}})["error"]
    assert log.snapshot() == ()


def test_an_unchanged_report_writes_nothing(cluster: Cluster) -> None:  # noqa: F811
    report = report_annotations("eth0", [], [CniFailure("x/a", "DEL", 11, "etcd away", 1.0)])
    node = NodeController(
        cluster.ds, "me", "vxlan", UNDERLAY, lambda: [], cluster.informers.nodes, lease_ttl=2, report=lambda: report
    )
    node.register()
    before = cluster.ds.get(NODE, "me")
    node.register()
    assert cluster.ds.get(NODE, "me") == before
    assert (
        before is not None and json.loads(before["metadata"]["annotations"][ANNOTATION_CNI_FAILURES])[0]["pod"] == "x/a"
    )
    assert problems_of(before) == []


def test_a_problem_that_comes_after_the_write_is_noticed_by_the_heartbeat(cluster: Cluster) -> None:  # noqa: F811
    problems: list[str] = []
    node = NodeController(
        cluster.ds,
        "me",
        "vxlan",
        UNDERLAY,
        lambda: [],
        cluster.informers.nodes,
        lease_ttl=2,
        report=lambda: report_annotations("eth0", problems, []),
    )
    node.register()
    stop = threading.Event()
    try:
        node.start_heartbeat(stop)
        problems.append("last policy reconcile failed: nft said no")
        assert wait_until(lambda: FULL in node._queued, 10)
    finally:
        stop.set()
    node.run_pending()
    stored = cluster.ds.get(NODE, "me")
    assert stored is not None and problems_of(stored) == ["last policy reconcile failed: nft said no"]


def test_the_failures_kept_are_the_newest_per_pod_and_bounded() -> None:
    failures: tuple[CniFailure, ...] = ()
    for i in range(MAX_CNI_FAILURES + 5):
        failures = with_failure(failures, CniFailure(f"x/p{i % (MAX_CNI_FAILURES + 2)}", "ADD", 11, str(i), float(i)))
    assert len(failures) == MAX_CNI_FAILURES
    assert len({f.pod for f in failures}) == MAX_CNI_FAILURES
    assert failures[0].message == str(MAX_CNI_FAILURES + 4)


def test_a_damaged_report_reads_as_nothing() -> None:
    node = {"metadata": {"annotations": {ANNOTATION_CNI_FAILURES: "[{", "tulle.dev/agent-problems": "{}"}}}
    assert cni_failures_of(node) == [] and problems_of(node) is None
    node["metadata"]["annotations"][ANNOTATION_CNI_FAILURES] = json.dumps([{"pod": 1}, {"pod": "x/a"}])
    assert cni_failures_of(node) == []
