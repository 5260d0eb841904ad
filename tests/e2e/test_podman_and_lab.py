"""A real CNI client (podman with its CNI backend) end to end, and a lab that leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from tulle.datastore.base import Datastore
from tulle.ipam.allocator import NodeAllocator
from tulle.lab.cluster import Lab
from tulle.lab.etcd_server import pid_alive
from tulle.model.kinds import WORKLOAD_ENDPOINT

from ..lablib import lab_leftovers, ping, pod_ips, pod_netns, running_lab, state, unique_lab_name

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _allocations(lab: Lab, node: str) -> dict[str, list[str]]:
    def read(store: Datastore) -> dict[str, list[str]]:
        return NodeAllocator(store, node, lambda: []).allocations()

    return lab.with_store(state(lab), read)


def test_podman_containers_on_two_nodes_reach_each_other_and_stopping_one_frees_its_addresses() -> None:
    with running_lab("pm", nodes=2, mode="vxlan") as lab:
        a = lab.add_pod("node1", "default", "web", {"app": "web"}, [], runtime="podman")
        b = lab.add_pod("node2", "default", "db", {"app": "db"}, [], runtime="podman")
        assert len(a["ips"]) == 2 and len(b["ips"]) == 2
        for family in (4, 6):
            assert ping(pod_netns(lab, "default/web"), pod_ips(lab, "default/db")[family])
            assert ping(pod_netns(lab, "default/db"), pod_ips(lab, "default/web")[family])
        # podman ran ADD with K8S_POD_NAME=<container name> and no namespace: default/web
        weps = lab.with_store(state(lab), lambda store: store.list(WORKLOAD_ENDPOINT)[0])
        assert {(w["metadata"]["namespace"], w["spec"]["pod"]) for w in weps} == {
            ("default", "web"),
            ("default", "db"),
        }
        container_id = state(lab)["pods"]["default/web"]["containerID"]
        assert f"tulle/{container_id}/eth0" in _allocations(lab, "node1")
        lab.del_pod("default", "web")  # podman rm: podman runs DEL
        assert f"tulle/{container_id}/eth0" not in _allocations(lab, "node1")
        weps = lab.with_store(state(lab), lambda store: store.list(WORKLOAD_ENDPOINT)[0])
        assert {w["spec"]["pod"] for w in weps} == {"db"}


def test_lab_down_leaves_nothing_behind() -> None:
    lab = Lab(unique_lab_name("dn"))
    try:
        lab.up(nodes=2, mode="hybrid")
        lab.add_pod("node1", "x", "a", {}, [])
        lab.add_pod("node2", "default", "p", {}, [], runtime="podman")
        pids = [n["pid"] for n in state(lab)["nodes"].values()] + [state(lab)["etcd"]["pid"]]
        assert all(pid_alive(p) for p in pids)
        assert lab_leftovers(lab.name)  # the check sees a running lab
    finally:
        lab.down()
    assert lab_leftovers(lab.name) == []
    assert not any(pid_alive(p) for p in pids)
    assert not os.path.exists(f"/run/tulle/labs/{lab.name}")
