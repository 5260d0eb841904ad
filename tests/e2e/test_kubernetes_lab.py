"""`tulle lab up --kubernetes`: upstream kube-apiserver, controller-manager, scheduler, and on each
node a containerd and a kubelet calling Tulle's CNI plugin. Pods made with kubectl get addresses
from Tulle's pools and reach each other across nodes; `lab down` leaves nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tulle.lab import images
from tulle.lab import kubernetes as lab_kubernetes
from tulle.lab import state as lab_state
from tulle.lab.cluster import Lab

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        bool(lab_kubernetes.binaries_missing()),
        reason=f"Kubernetes binaries not built in {images.bin_dir()}: run scripts/build-kubernetes",
    ),
    pytest.mark.skipif(
        subprocess.run(["which", "containerd"], capture_output=True).returncode != 0,
        reason="containerd is not installed: run scripts/install-deps",
    ),
]

LAB = "k11bt"
POOLS = [ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:10:244::/104")]


def _pod(name: str, node: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "k11"}},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "a", "image": images.AGNHOST_IMAGE, "args": ["netexec", "--http-port=8080"]}],
            },
        }
    )


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(LAB)
    if lab.exists():
        lab.down()
    lab.up(nodes=2, mode="vxlan", kubernetes=True)
    try:
        yield lab
    finally:
        lab.down()


def _kubectl(lab: Lab, *args: str, stdin: str | None = None) -> str:
    netns = f"/run/netns/{lab.names.underlay}"
    cmd = [
        "nsenter",
        f"--net={netns}",
        lab_kubernetes.kubectl_binary(),
        f"--kubeconfig={lab_kubernetes.kubeconfig_path(lab.dir)}",
    ]
    out = subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _container_pid(lab: Lab, node: str, container_id: str) -> int:
    sock = lab_kubernetes.node_paths(lab.node_dir(node))["containerdSocket"]
    out = subprocess.run(["ctr", "-a", sock, "-n", "k8s.io", "tasks", "ls"], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"no task {container_id} on {node}")


def test_kubectl_pods_get_tulle_addresses_and_reach_each_other_across_nodes(lab: Lab) -> None:
    for name, node in (("p1", "node1"), ("p2", "node2")):
        _kubectl(lab, "apply", "-f", "-", stdin=_pod(name, node))
    _kubectl(lab, "wait", "--for=condition=Ready", "pod/p1", "pod/p2", "--timeout=90s")
    pods = {p["metadata"]["name"]: p for p in json.loads(_kubectl(lab, "get", "pods", "-o", "json"))["items"]}
    addresses = {name: [ipaddress.ip_address(ip["ip"]) for ip in p["status"]["podIPs"]] for name, p in pods.items()}
    for name, ips in addresses.items():
        assert sorted(ip.version for ip in ips) == [4, 6], (name, ips)
        assert all(any(ip in pool for pool in POOLS) for ip in ips), (name, ips)
    p1_container = pods["p1"]["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    pid = _container_pid(lab, "node1", p1_container)
    for ip in addresses["p2"]:
        target = f"[{ip}]:8080" if ip.version == 6 else f"{ip}:8080"
        agnhost = os.path.join(images.bin_dir(), "agnhost")
        out = subprocess.run(
            ["nsenter", f"--net=/proc/{pid}/ns/net", agnhost, "connect", target, "--timeout=5s"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, (target, out.stderr)
    # kubectl exec goes API server -> kubelet on the node's address.
    assert _kubectl(lab, "exec", "p1", "--", "/agnhost", "connect", f"{addresses['p2'][0]}:8080", "--timeout=5s") == ""


def test_lab_down_leaves_nothing(lab: Lab) -> None:
    _kubectl(lab, "apply", "-f", "-", stdin=_pod("p1", "node1"))
    _kubectl(lab, "wait", "--for=condition=Ready", "pod/p1", "--timeout=90s")
    state = lab_state.load(LAB)
    pids = [state["kubernetes"][k] for k in ("apiserver", "controllerManager", "scheduler")]
    pids += [n[k] for n in state["kubernetes"]["nodes"].values() for k in ("containerd", "kubelet")]
    cgroups = [n["cgroupRoot"] for n in state["kubernetes"]["nodes"].values()]
    lab.down()
    assert not lab.exists()
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    with open("/proc/self/mounts") as f:
        assert not [line for line in f if lab.dir in line]
    assert not [c for c in cgroups if any(os.path.isdir(h + c) for h in lab_kubernetes._hierarchies())]
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(f"{LAB}-")]
