"""`tulle lab`: a multi-node cluster made of network namespaces, with real etcd, real agents and
a real CNI client. The same plugin, agent and datastore as on real machines; only the
machines are namespaces. Processes are tracked by PID and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from tulle.cni.conflist import conflist, write_conflist
from tulle.dataplane.netns import run_in_netns
from tulle.datastore.etcd import EtcdDatastore
from tulle.datastore.etcd_server import pid_alive, start_etcd, stop_pid
from tulle.ipam.pools import pool_object
from tulle.lab import state as lab_state
from tulle.lab import topology
from tulle.lab.podman import Podman, make_rootfs
from tulle.lab.runtime import CniRuntime
from tulle.lab.topology import Names, TopologyError
from tulle.model.kinds import NAMESPACE, NODE, POD
from tulle.model.store import ResourceStore

T = TypeVar("T")

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
CNI_BIN_DIR = os.path.join(REPO, "bin", "cni")
CNI_PATH = [CNI_BIN_DIR, "/usr/lib/cni"]
NETWORK = "tulle"
ETCD_PORT = 2379
DEFAULT_POOLS = {4: ("default-ipv4", "10.244.0.0/16", 26), 6: ("default-ipv6", "fd00:10:244::/104", 122)}


class LabError(Exception):
    pass


def _subnet_for(index: int, mode: str) -> int:
    """host-gw needs one link between all nodes: subnet 1 for all. Otherwise nodes 1 and 2 are on
    subnet 1, 3 and 4 on subnet 2, and so on: a lab of 3 or more nodes spans two subnets joined by
    a router, so hybrid mode has one direct pair and one pair through VXLAN."""
    if mode == "host-gw":
        return 1
    return 1 + ((index - 1) // 2) % 2


class Lab:
    def __init__(self, name: str) -> None:
        if not topology.NAME_RE.match(name):
            raise LabError(
                f"lab name {name!r} must be 1 to 8 lowercase letters and digits, starting with a letter "
                "(interface names carry it and are limited to 15 characters)"
            )
        self.name = name
        self.names = Names(name)
        self.dir = lab_state.lab_dir(name)

    # -- the datastore, reached from inside the underlay ---------------------------------

    def with_store(self, state: dict[str, Any], fn: Callable[[ResourceStore], T]) -> T:
        url = state["etcd"]["url"]

        def call() -> T:
            ds = EtcdDatastore(url)
            try:
                return fn(ResourceStore(ds))
            finally:
                ds.close()

        return run_in_netns(f"/run/netns/{self.names.underlay}", call)

    # -- up and down ------------------------------------------------------------------------

    def up(
        self,
        nodes: int,
        mode: str,
        ipv4_only: bool = False,
        lease_ttl: int = 15,
        node_grace: float = 60.0,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> dict[str, Any]:
        if os.path.exists(lab_state.state_path(self.name)) or topology.lab_namespaces(self.name):
            raise LabError(f"lab {self.name!r} exists already; `tulle lab down {self.name}` first")
        if not os.path.exists(os.path.join(CNI_BIN_DIR, "tulle")):
            raise LabError(f"the CNI plugin is not built ({CNI_BIN_DIR}/tulle): run `make cni`")
        os.makedirs(self.dir, exist_ok=True)
        state: dict[str, Any] = {
            "name": self.name,
            "mode": mode,
            "ipv4Only": ipv4_only,
            "created": time.time(),
            "underlay": {"netns": self.names.underlay},
            "agent": {"leaseTtl": lease_ttl, "nodeGrace": node_grace},
            "nodes": {},
            "pods": {},
            "nextIndex": 1,
        }
        lab_state.save(self.name, state)
        try:
            progress("underlay and external host")
            topology.create_underlay(self.names)
            ext = topology.create_external(self.names)
            state["external"] = {"netns": self.names.external, "addresses": list(ext)}
            lab_state.save(self.name, state)
            progress("etcd")
            server = start_etcd(
                data_dir=os.path.join(self.dir, "etcd"),
                client_host=f"{topology.subnet_v4(1)}.1",
                client_port=ETCD_PORT,
                peer_port=2380,
                log_path=os.path.join(self.dir, "etcd.log"),
                netns=self.names.underlay,
                name=f"{self.name}-etcd",
            )
            state["etcd"] = {"pid": server.pid, "url": server.url}
            lab_state.save(self.name, state)
            families = [4] if ipv4_only else [4, 6]
            self.with_store(state, lambda store: self._create_pools(store, families))
            for _ in range(nodes):
                node = f"node{state['nextIndex']}"
                progress(f"node {node}")
                self._add_node(state, node)
            lab_state.save(self.name, state)
            progress("waiting for the agents")
            for node in state["nodes"]:
                self.wait_agent_ready(state, node)
        except BaseException:
            lab_state.save(self.name, state)
            raise
        return state

    @staticmethod
    def _create_pools(store: ResourceStore, families: list[int]) -> None:
        for family in families:
            name, cidr, block = DEFAULT_POOLS[family]
            store.apply(_admit(pool_object(name, cidr, block), store))

    def down(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        """Stop every process of the lab by PID and remove everything it made."""
        try:
            state = lab_state.load(self.name)
        except lab_state.LabNotFound:
            state = {}
        for key, pod in sorted(state.get("pods", {}).items()):
            if pod.get("runtime") == "podman":
                progress(f"podman container {key}")
                node = state["nodes"].get(pod["node"])
                if node:
                    self._podman(node, pod["node"]).remove(pod["container"])
        for node_name, node in sorted(state.get("nodes", {}).items()):
            if node.get("pid"):
                progress(f"agent {node_name}")
                stop_pid(node["pid"], expect="tulle")
        if state.get("etcd", {}).get("pid"):
            progress("etcd")
            stop_pid(state["etcd"]["pid"], expect="etcd")
        progress("namespaces")
        for ns in topology.lab_namespaces(self.name):
            topology.del_netns(ns)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- nodes ------------------------------------------------------------------------------

    def node_dir(self, node: str) -> str:
        return os.path.join(self.dir, "nodes", node)

    def agent_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "agent.sock")

    def _add_node(self, state: dict[str, Any], node: str) -> None:
        if not topology.NODE_RE.match(node):
            raise LabError(f"node name {node!r} must be lowercase letters, digits and '-', starting with a letter")
        if node in state["nodes"]:
            raise LabError(f"node {node} exists already in lab {self.name}")
        index = state["nextIndex"]
        state["nextIndex"] = index + 1
        subnet = _subnet_for(index, state["mode"])
        record: dict[str, Any] = {"index": index, "subnet": subnet, "netns": self.names.node(node)}
        state["nodes"][node] = record
        lab_state.save(self.name, state)
        v4, v6 = topology.create_node(self.names, node, index, subnet)
        record["addresses"] = [v4, v6]
        node_dir = self.node_dir(node)
        os.makedirs(node_dir, exist_ok=True)
        conf_dir = os.path.join(node_dir, "cni")
        write_conflist(conf_dir, conflist(NETWORK, self.agent_socket(node), os.path.join(node_dir, "state")))
        record["pid"] = self._start_agent(state, node)
        lab_state.save(self.name, state)

    def _start_agent(self, state: dict[str, Any], node: str) -> int:
        node_dir = self.node_dir(node)
        cmd = [
            "nsenter",
            f"--net=/run/netns/{self.names.node(node)}",
            sys.executable,
            "-m",
            "tulle.cli.main",
            "agent",
            "--node",
            node,
            "--datastore",
            state["etcd"]["url"],
            "--mode",
            state["mode"],
            "--state-dir",
            os.path.join(node_dir, "state"),
            "--socket",
            self.agent_socket(node),
            "--interface",
            self.names.uplink,
            "--lease-ttl",
            str(state["agent"]["leaseTtl"]),
            "--node-grace",
            str(state["agent"]["nodeGrace"]),
        ]
        with open(os.path.join(node_dir, "agent.log"), "ab") as log:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return proc.pid

    def agent_call(self, node: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        from tulle.cni.plugin import call_agent

        return call_agent(self.agent_socket(node), request, timeout)

    def wait_agent_ready(self, state: dict[str, Any], node: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        pid = state["nodes"][node]["pid"]
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise LabError(f"the agent of {node} exited; see {self.node_dir(node)}/agent.log")
            try:
                status = self.agent_call(node, {"command": "AGENT_STATUS"}, timeout=5)["result"]
                if status.get("ready"):
                    return
                last = status.get("lastError") or "not ready"
            except Exception as exc:
                last = str(exc)
            time.sleep(0.1)
        raise LabError(f"the agent of {node} is not ready after {timeout:.0f} s ({last}); see its agent.log")

    def restart_agent(self, node: str) -> int:
        """Stop the node's agent by PID and start it again; pods stay as they are."""
        with lab_state.locked(self.name) as state:
            record = state["nodes"][node]
            stop_pid(record["pid"], expect="tulle")
            record["pid"] = self._start_agent(state, node)
        self.wait_agent_ready(lab_state.load(self.name), node)
        return int(record["pid"])

    def stop_agent(self, node: str) -> None:
        with lab_state.locked(self.name) as state:
            record = state["nodes"][node]
            stop_pid(record["pid"], expect="tulle")
            record["pid"] = 0

    def start_agent(self, node: str) -> int:
        with lab_state.locked(self.name) as state:
            record = state["nodes"][node]
            if record.get("pid") and pid_alive(record["pid"]):
                return int(record["pid"])
            record["pid"] = self._start_agent(state, node)
        self.wait_agent_ready(lab_state.load(self.name), node)
        return int(record["pid"])

    def add_node(self, node: str) -> dict[str, Any]:
        with lab_state.locked(self.name) as state:
            if not state:
                raise lab_state.LabNotFound(f"there is no lab named {self.name!r}")
            self._add_node(state, node)
        state = lab_state.load(self.name)
        self.wait_agent_ready(state, node)
        record: dict[str, Any] = state["nodes"][node]
        return record

    def del_node(self, node: str) -> None:
        """The node goes away: its agent stops, its namespace (and pods) vanish, its Node object is
        deleted; the other nodes drop their routes to it and free its blocks after the grace period."""
        with lab_state.locked(self.name) as state:
            record = state["nodes"].get(node)
            if record is None:
                raise LabError(f"lab {self.name} has no node {node}")
            for key, pod in list(state["pods"].items()):
                if pod["node"] == node:
                    if pod.get("runtime") == "podman":
                        self._podman(record, node).remove(pod["container"])
                    elif pod.get("netns"):
                        topology.del_netns(os.path.basename(pod["netns"]))
                    del state["pods"][key]
            if record.get("pid"):
                stop_pid(record["pid"], expect="tulle")
            topology.delete_node(self.names, node, record["index"])
            self.with_store(state, lambda store: store.delete(NODE, node))
            shutil.rmtree(self.node_dir(node), ignore_errors=True)
            del state["nodes"][node]

    # -- pods -------------------------------------------------------------------------------

    def _podman(self, record: dict[str, Any], node: str) -> Podman:
        return Podman(self.node_dir(node), record["netns"], os.path.join(self.node_dir(node), "cni"), CNI_PATH)

    def add_pod(
        self,
        node: str,
        namespace: str,
        pod: str,
        labels: dict[str, str],
        ports: list[dict[str, Any]],
        runtime: str = "cni",
    ) -> dict[str, Any]:
        with lab_state.locked(self.name) as state:
            if not state:
                raise lab_state.LabNotFound(f"there is no lab named {self.name!r}")
            record = state["nodes"].get(node)
            if record is None:
                raise LabError(f"lab {self.name} has no node {node} (nodes: {', '.join(sorted(state['nodes']))})")
            key = f"{namespace}/{pod}"
            if key in state["pods"]:
                raise LabError(f"pod {key} exists already in lab {self.name}")
            if runtime == "podman" and namespace != "default":
                raise LabError("podman passes no K8S_POD_NAMESPACE, so podman pods live in namespace 'default'")
            pod_obj = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace, "labels": labels},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "main", "image": "busybox", "ports": ports}],
                },
            }

            def write(store: ResourceStore) -> None:
                if store.get(NAMESPACE, namespace) is None:
                    ns_obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
                    store.apply(_admit(ns_obj, store))
                store.apply(_admit(pod_obj, store))

            self.with_store(state, write)
            entry: dict[str, Any] = {"node": node, "runtime": runtime, "ifname": "eth0"}
            conf = self._conflist(node)
            if runtime == "cni":
                netns = self.names.pod(namespace, pod)
                topology.add_netns(netns)
                entry["netns"] = f"/run/netns/{netns}"
                entry["containerID"] = uuid.uuid4().hex
                entry["args"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"
                try:
                    result = CniRuntime(CNI_PATH, f"/run/netns/{record['netns']}").add(
                        conf, entry["containerID"], entry["netns"], "eth0", entry["args"]
                    )
                except BaseException:
                    topology.del_netns(netns)
                    self.with_store(state, lambda store: store.delete(POD, pod, namespace))
                    raise
                entry["result"] = result
            elif runtime == "podman":
                make_rootfs(os.path.join(self.dir, "rootfs"))
                podman = self._podman(record, node)
                try:
                    info = podman.start(pod, NETWORK, os.path.join(self.dir, "rootfs"))
                except BaseException:
                    podman.remove(pod)
                    self.with_store(state, lambda store: store.delete(POD, pod, namespace))
                    raise
                entry["container"] = pod
                entry["containerID"] = info["Id"]
                entry["netns"] = info["NetworkSettings"]["SandboxKey"]
                entry["result"] = None
            else:
                raise LabError(f"--runtime must be cni or podman, not {runtime!r}")
            entry["ips"] = self._pod_addresses(entry["netns"])
            state["pods"][key] = entry
            host_ip = record["addresses"][0]
            self.with_store(state, lambda store: _mark_running(store, namespace, pod, entry["ips"], host_ip))
            return {"pod": key, "node": node, "ips": entry["ips"]}

    @staticmethod
    def _pod_addresses(netns: str) -> list[str]:
        """The pod's own addresses, read from inside it (not the gateway or link-local ones)."""
        proc = subprocess.run(
            ["nsenter", f"--net={netns}", "ip", "-j", "addr", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        )
        out = []
        for link in json.loads(proc.stdout):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global":
                    out.append(a["local"])
        return sorted(out, key=lambda a: (":" in a, a))

    def _conflist(self, node: str) -> dict[str, Any]:
        with open(os.path.join(self.node_dir(node), "cni", "10-tulle.conflist")) as f:
            data: dict[str, Any] = json.load(f)
            return data

    def del_pod(self, namespace: str, pod: str) -> None:
        key = f"{namespace}/{pod}"
        with lab_state.locked(self.name) as state:
            entry = state.get("pods", {}).get(key)
            if entry is None:
                raise LabError(f"lab {self.name} has no pod {key}")
            record = state["nodes"][entry["node"]]
            if entry["runtime"] == "podman":
                self._podman(record, entry["node"]).remove(entry["container"])
            else:
                CniRuntime(CNI_PATH, f"/run/netns/{record['netns']}").delete(
                    self._conflist(entry["node"]),
                    entry["containerID"],
                    entry["netns"],
                    entry["ifname"],
                    entry["args"],
                    prev_result=entry.get("result"),
                )
                topology.del_netns(os.path.basename(entry["netns"]))
            self.with_store(state, lambda store: store.delete(POD, pod, namespace))
            del state["pods"][key]

    def pod_netns(self, namespace: str, pod: str) -> str:
        state = lab_state.load(self.name)
        entry = state.get("pods", {}).get(f"{namespace}/{pod}")
        if entry is None:
            raise LabError(f"lab {self.name} has no pod {namespace}/{pod}")
        return str(entry["netns"])

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = lab_state.load(self.name)
        nodes = []
        for name, record in sorted(state["nodes"].items(), key=lambda kv: kv[1]["index"]):
            alive = bool(record.get("pid")) and pid_alive(record["pid"])
            nodes.append(
                {
                    "name": name,
                    "netns": record["netns"],
                    "addresses": record.get("addresses", []),
                    "subnet": record["subnet"],
                    "agent": {"pid": record.get("pid"), "running": alive},
                }
            )
        pods = [
            {
                "pod": key,
                "node": p["node"],
                "ips": p.get("ips", []),
                "runtime": p["runtime"],
                "netns": p["netns"],
            }
            for key, p in sorted(state["pods"].items())
        ]
        return {
            "name": self.name,
            "mode": state["mode"],
            "etcd": state.get("etcd", {}).get("url"),
            "nodes": nodes,
            "pods": pods,
            "external": state.get("external", {}),
        }


def _mark_running(store: ResourceStore, namespace: str, pod: str, ips: list[str], host_ip: str) -> None:
    """What the kubelet reports once the sandbox has its network: phase and addresses."""
    obj = store.get(POD, pod, namespace)
    if obj is None:
        return
    obj["status"] = {
        "phase": "Running",
        "hostIP": host_ip,
        "podIP": ips[0] if ips else "",
        "podIPs": [{"ip": ip} for ip in ips],
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0, "started": True}],
    }
    store.update(obj)


def _admit(obj: dict[str, Any], store: ResourceStore) -> dict[str, Any]:
    """Defaulting and validation, as `tulle apply` does (when the validation module is present)."""
    try:
        from tulle.model.validation import admit
    except ImportError:
        return obj
    admitted: dict[str, Any] = admit(obj, store)
    return admitted


__all__ = ["Lab", "LabError", "TopologyError"]
