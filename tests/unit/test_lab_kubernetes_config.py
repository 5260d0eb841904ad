"""The configuration the `--kubernetes` lab gives its kubelets, containerds and API server (pure)."""

from __future__ import annotations

from tulle.lab import kubernetes as k


def test_each_node_has_its_own_runtime_state_and_the_traps_of_this_machine_are_set() -> None:
    one, two = k.node_paths("/labs/x/nodes/node1"), k.node_paths("/labs/x/nodes/node2")
    assert not set(one.values()) & set(two.values())
    conf = k.kubelet_config(one, "172.30.1.11", k.cgroup_root("x", "node1"), "/ca.crt")
    assert conf["failCgroupV1"] is False and conf["failSwapOn"] is False
    assert conf["cgroupDriver"] == "cgroupfs" and conf["cgroupRoot"] == "/tulle-x-node1"
    assert conf["podLogsDir"] == one["podLogs"] and conf["address"] == "172.30.1.11"
    assert k.cgroup_root("x", "node1") != k.cgroup_root("x", "node2")
    toml = k.containerd_config(one)
    for needed in ("SystemdCgroup = false", "restrict_oom_score_adj = true", one["runcRoot"], one["cniConf"]):
        assert needed in toml


def test_api_server_serves_both_families_on_the_underlay_and_can_reach_kubelets() -> None:
    args = k.apiserver_args("/d", "172.30.1.1", "https://172.30.1.1:2379", dual_stack=True)
    assert f"--service-cluster-ip-range={','.join(k.SERVICE_CIDRS)}" in args
    assert "--bind-address=172.30.1.1" in args
    assert any(a.startswith("--kubelet-client-certificate=") for a in args)
    v4_only = k.apiserver_args("/d", "172.30.1.1", "https://172.30.1.1:2379", dual_stack=False)
    assert f"--service-cluster-ip-range={k.SERVICE_CIDRS[0]}" in v4_only
