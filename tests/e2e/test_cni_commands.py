"""Every CNI command against a real agent in a lab node, run the way a runtime runs the plugin.

Spec 1.1.0: results in the version of the request, CHECK noticing what went missing,
idempotent DEL (also while the agent is down), STATUS, GC, CNI_ARGS, chaining after us.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tulle.cni import spec
from tulle.datastore.base import Datastore
from tulle.ipam.allocator import NodeAllocator
from tulle.lab import topology
from tulle.lab.cluster import CNI_PATH, Lab
from tulle.lab.runtime import CniRuntime, exec_plugin
from tulle.model.kinds import WORKLOAD_ENDPOINT

from ..lablib import TcpEcho, node_ips, node_netns, run_in, running_lab, state, tcp_reachable

pytestmark = [pytest.mark.root, pytest.mark.slow]
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab("cn", nodes=1, mode="vxlan") as lab:
        yield lab


class Cni:
    """The runtime's side: pod namespaces, plugin calls and what the agent then holds."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node = "node1"
        self.host_netns = node_netns(lab, "node1")

    def config(self, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
        node_dir = self.lab.node_dir(self.node)
        conf = {
            "cniVersion": version,
            "name": "tulle",
            "type": "tulle",
            "agentSocket": self.lab.agent_socket(self.node),
            "stateDir": os.path.join(node_dir, "state"),
        }
        conf.update(extra)
        return conf

    def new_netns(self) -> str:
        name = f"{self.lab.name}-pod-t-{uuid.uuid4().hex[:8]}"
        topology.add_netns(name)
        return f"/run/netns/{name}"

    def call(
        self,
        command: str,
        config: dict[str, Any],
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
    ) -> tuple[int, dict[str, Any] | None]:
        inv = exec_plugin(
            "tulle",
            command,
            config,
            cni_path=CNI_PATH,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=args,
            host_netns=self.host_netns,
        )
        return inv.status, (json.loads(inv.stdout) if inv.stdout.strip() else None)

    def add(self, version: str = "1.1.0", args: str = "") -> tuple[str, str, dict[str, Any]]:
        cid, netns = uuid.uuid4().hex, self.new_netns()
        status, result = self.call("ADD", self.config(version), cid, netns, args=args)
        assert status == 0, result
        assert result is not None
        return cid, netns, result

    def allocations(self) -> dict[str, list[str]]:
        def read(store: Datastore) -> dict[str, list[str]]:
            return NodeAllocator(store, self.node, lambda: []).allocations()

        return self.lab.with_store(state(self.lab), read)

    def endpoints(self) -> list[dict[str, Any]]:
        return self.lab.with_store(state(self.lab), lambda store: store.list(WORKLOAD_ENDPOINT)[0])

    def host_links(self) -> set[str]:
        links = json.loads(run_in(self.host_netns, ["ip", "-j", "link", "show"], check=True).stdout)
        return {link["ifname"] for link in links}


@pytest.fixture
def cni(lab: Lab) -> Cni:
    return Cni(lab)


def addresses_in(netns: str) -> set[str]:
    data = json.loads(run_in(netns, ["ip", "-j", "addr", "show", "dev", "eth0"], check=True).stdout)
    return {a["local"] for link in data for a in link["addr_info"] if a.get("scope") == "global"}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_answers_in_the_version_asked_and_del_gives_everything_back(cni: Cni, version: str) -> None:
    cid, netns, result = cni.add(version)
    assert result["cniVersion"] == version
    host, pod = result["interfaces"]
    assert "sandbox" not in host and host["name"].startswith("tl")
    assert pod == {**pod, "name": "eth0", "sandbox": netns}
    addresses = {ip["address"].split("/")[0] for ip in result["ips"]}
    assert len(addresses) == 2
    assert addresses_in(netns) == addresses
    for ip in result["ips"]:
        assert ip["interface"] == 1
        if version < "1.0.0":
            assert ip["version"] == ("6" if ":" in ip["address"] else "4")
        else:
            assert "version" not in ip
    assert ("mtu" in pod) == (version == "1.1.0")
    handle = f"tulle/{cid}/eth0"
    assert sorted(cni.allocations()[handle]) == sorted(addresses)
    status, out = cni.call("DEL", dict(cni.config(version), prevResult=result), cid, netns)
    assert status == 0 and out is None
    assert handle not in cni.allocations()
    assert host["name"] not in cni.host_links()


def test_check_passes_after_add(cni: Cni) -> None:
    cid, netns, result = cni.add("0.4.0")
    status, out = cni.call("CHECK", cni.config("0.4.0", prevResult=result), cid, netns)
    assert status == 0 and out is None


def test_check_notices_a_removed_address(cni: Cni) -> None:
    cid, netns, result = cni.add()
    address = result["ips"][0]["address"]
    run_in(netns, ["ip", "addr", "del", address, "dev", "eth0"], check=True)
    status, out = cni.call("CHECK", cni.config(prevResult=result), cid, netns)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_CHECK_MISMATCH
    assert address in out["details"]


def test_check_notices_a_removed_route(cni: Cni) -> None:
    cid, netns, result = cni.add()
    host = result["interfaces"][0]["name"]
    address = result["ips"][0]["address"].split("/")[0]
    run_in(cni.host_netns, ["ip", "route", "del", address, "dev", host], check=True)
    _, out = cni.call("CHECK", cni.config(prevResult=result), cid, netns)
    assert out is not None and out["code"] == spec.ERR_CHECK_MISMATCH
    assert f"no route to {address}" in out["details"]
    # and a removed default route inside the pod
    cid, netns, result = cni.add()
    run_in(netns, ["ip", "route", "del", "default"], check=True)
    _status, out = cni.call("CHECK", cni.config(prevResult=result), cid, netns)
    assert out is not None and out["code"] == spec.ERR_CHECK_MISMATCH
    assert "route 0.0.0.0/0 is missing" in out["details"]


def test_check_of_an_unknown_container_is_error_3(cni: Cni) -> None:
    netns = cni.new_netns()
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.244.0.9/32"}]}
    _status, out = cni.call("CHECK", cni.config(prevResult=prev), "nosuchcontainer", netns)
    assert out is not None and out["code"] == spec.ERR_UNKNOWN_CONTAINER


def test_del_is_idempotent(cni: Cni) -> None:
    cid, netns, result = cni.add()
    for _ in range(2):
        status, out = cni.call("DEL", cni.config(prevResult=result), cid, netns)
        assert status == 0 and out is None
    # a DEL for a container nobody ever added
    assert cni.call("DEL", cni.config(), "neveradded", cni.new_netns())[0] == 0


def test_del_without_netns_cleans_up(cni: Cni) -> None:
    cid, _netns, result = cni.add()
    host = result["interfaces"][0]["name"]
    status, _ = cni.call("DEL", cni.config(), cid, "")
    assert status == 0
    assert f"tulle/{cid}/eth0" not in cni.allocations()
    assert host not in cni.host_links()


def test_k8s_pod_identity_comes_from_cni_args(cni: Cni) -> None:
    cid, _, _ = cni.add(args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1")
    cid2, _, _ = cni.add(args="IgnoreUnknown=1;K8S_POD_NAME=podman-ctr")
    by_container = {e["spec"]["containerID"]: e for e in cni.endpoints()}
    assert by_container[cid]["metadata"]["namespace"] == "shop"
    assert by_container[cid]["spec"]["pod"] == "web-1"
    assert by_container[cid]["spec"]["node"] == "node1"
    assert by_container[cid2]["metadata"]["namespace"] == "default"
    assert by_container[cid2]["spec"]["pod"] == "podman-ctr"


def test_gc_removes_attachments_that_are_not_valid(cni: Cni) -> None:
    keep, _, keep_result = cni.add()
    drop, _, drop_result = cni.add()
    valid = [{"containerID": keep, "ifname": "eth0"}]
    status, out = cni.call("GC", cni.config(**{"cni.dev/valid-attachments": valid}))
    assert status == 0 and out is None
    allocations = cni.allocations()
    assert f"tulle/{keep}/eth0" in allocations
    assert f"tulle/{drop}/eth0" not in allocations
    links = cni.host_links()
    assert keep_result["interfaces"][0]["name"] in links
    assert drop_result["interfaces"][0]["name"] not in links


def test_status_is_ready_with_the_agent(cni: Cni) -> None:
    status, out = cni.call("STATUS", cni.config())
    assert status == 0 and out is None


def test_agent_down_add_is_11_status_is_50_and_del_is_carried_out_on_return(cni: Cni, lab: Lab) -> None:
    cid, netns, result = cni.add()
    host = result["interfaces"][0]["name"]
    lab.stop_agent("node1")
    try:
        status, out = cni.call("STATUS", cni.config())
        assert out is not None and out["code"] == spec.ERR_PLUGIN_NOT_AVAILABLE
        status, out = cni.call("ADD", cni.config(), uuid.uuid4().hex, cni.new_netns())
        assert out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER
        status, out = cni.call("DEL", cni.config(prevResult=result), cid, netns)
        assert status == 0 and out is None
        assert f"tulle/{cid}/eth0" in cni.allocations()  # nobody could release it yet
    finally:
        lab.start_agent("node1")
    assert f"tulle/{cid}/eth0" not in cni.allocations()
    assert host not in cni.host_links()
    assert cid not in {e["spec"]["containerID"] for e in cni.endpoints()}


def test_bad_input_changes_nothing(cni: Cni) -> None:
    before_links, before_alloc = cni.host_links(), cni.allocations()
    netns = cni.new_netns()
    for conf in (
        cni.config(version="9.9.9"),
        {k: v for k, v in cni.config().items() if k != "name"},
        cni.config(mtu="big"),
    ):
        status, out = cni.call("ADD", conf, uuid.uuid4().hex, netns)
        assert status != 0 and out is not None and out["code"] in (1, 7)
    inv = exec_plugin("tulle", "ADD", {}, cni_path=CNI_PATH, container_id="x", netns=netns, ifname="eth0")
    assert inv.status != 0
    status, out = cni.call("ADD", cni.config(), uuid.uuid4().hex, "/run/netns/does-not-exist")
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT
    assert cni.host_links() == before_links
    assert cni.allocations() == before_alloc


def test_fifty_parallel_adds_get_fifty_different_addresses(cni: Cni) -> None:
    netnses = [cni.new_netns() for _ in range(50)]
    results: dict[str, dict[str, Any]] = {}
    failures: list[Any] = []
    barrier = threading.Barrier(50)

    def add(netns: str) -> None:
        cid = uuid.uuid4().hex
        barrier.wait()
        status, out = cni.call("ADD", cni.config(), cid, netns)
        if status == 0 and out is not None:
            results[cid] = out
        else:
            failures.append(out)

    threads = [threading.Thread(target=add, args=(n,)) for n in netnses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    addresses = [ip["address"] for r in results.values() for ip in r["ips"]]
    assert len(addresses) == 100 and len(set(addresses)) == 100
    for cid, result in results.items():
        assert cni.call("DEL", cni.config(prevResult=result), cid, result["interfaces"][1]["sandbox"])[0] == 0


def test_portmap_and_bandwidth_chain_after_tulle(cni: Cni, lab: Lab) -> None:
    """Debian's reference plugins (cniVersion up to 1.0.0) follow tulle in a conflist."""
    conflist = {
        "cniVersion": "1.0.0",
        "name": "tulle",
        "plugins": [
            {k: v for k, v in cni.config("1.0.0").items() if k not in ("cniVersion", "name")},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    runtime_config = {
        "portMappings": [{"hostPort": 8080, "containerPort": 7777, "protocol": "tcp"}],
        "bandwidth": {
            "ingressRate": 100_000_000,
            "ingressBurst": 1_000_000,
            "egressRate": 100_000_000,
            "egressBurst": 1_000_000,
        },
    }
    runtime = CniRuntime(CNI_PATH, cni.host_netns)
    cid, netns = uuid.uuid4().hex, cni.new_netns()
    result = runtime.add(conflist, cid, netns, "eth0", "", runtime_config)
    host = result["interfaces"][0]["name"]
    qdiscs = run_in(cni.host_netns, ["tc", "qdisc", "show", "dev", host], check=True).stdout
    assert "tbf" in qdiscs
    server = TcpEcho(netns, 4, port=7777)
    try:
        ext = f"/run/netns/{lab.names.external}"
        assert tcp_reachable(ext, node_ips(lab, "node1")[4], port=8080), "hostPort 8080 -> pod:7777"
    finally:
        server.close()
    runtime.delete(conflist, cid, netns, "eth0", "", prev_result=result, runtime_config=runtime_config)
    assert host not in cni.host_links()
    assert f"tulle/{cid}/eth0" not in cni.allocations()
