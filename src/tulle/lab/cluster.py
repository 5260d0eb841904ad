"""`tulle lab`: a multi-node cluster made of network namespaces, with real etcd, real agents and
a real CNI client. The same plugin, agent and datastore as on real machines; only the
machines are namespaces. Processes are tracked by PID and stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tulle.cni.conflist import conflist, write_conflist
from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import AccessControl, AtomicWriter, Datastore, DatastoreError, Login, Obj, TlsFiles
from tulle.datastore.factory import open_datastore
from tulle.lab import pki, topology
from tulle.lab import state as lab_state
from tulle.lab.etcd_server import EtcdServer, ServerTls, pid_alive, runs_as, stop_pid
from tulle.lab.etcd_server import start_etcd as launch_etcd
from tulle.lab.namespaces import PODMAN_NETNS_PREFIX, HeldNamespaces, podman_namespaces_linked_to, stop_processes_in
from tulle.lab.pod_server import ServeError, served_ports
from tulle.lab.pod_server import start as start_pod_server
from tulle.lab.podman import Podman, make_rootfs
from tulle.lab.runtime import CniRuntime
from tulle.lab.topology import Names, TopologyError
from tulle.model.kinds import NAMESPACE, NODE, POD
from tulle.model.pools import pool_object
from tulle.model.validation import AdmissionError, AdmissionErrors

T = TypeVar("T")

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
CNI_BIN_DIR = os.path.join(REPO, "bin", "cni")
CNI_PATH = [CNI_BIN_DIR, "/usr/lib/cni"]
NETWORK = "tulle"
POD_SERVER = "pod_server"  # in the command line of every `--serve` process: who it is, by PID
ETCD_PORT = 2379
ETCD_PEER_PORT = 2380
DEFAULT_POOLS = {4: ("default-ipv4", "10.244.0.0/16", 26), 6: ("default-ipv6", "fd00:10:244::/104", 122)}


class LabError(Exception):
    pass


class LabExists(LabError):
    """`lab up` of a name that a lab on this machine has already."""


# How long a command on one node's agent waits for it to get ready before it asks whether the
# lab's etcd answers at all.
DATASTORE_PATIENCE_S = 3.0


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

    def with_store(self, state: dict[str, Any], fn: Callable[[Datastore], T], timeout: float = 5.0) -> T:
        """`fn` on the lab's datastore, as the lab's admin (the CLI's user)."""
        access = lab_state.lab_datastore(state)
        return self._with_store_as(access.url, access.tls, access.login, fn, timeout)

    def _with_store_as(
        self, url: str, tls: TlsFiles, login: Login | None, fn: Callable[[Datastore], T], timeout: float = 5.0
    ) -> T:
        def call() -> T:
            ds = open_datastore(url, timeout=timeout, tls=tls, login=login)
            try:
                return fn(ds)
            finally:
                ds.close()

        return run_in_netns(f"/run/netns/{self.names.underlay}", call)

    def _with_access_control(self, state: dict[str, Any], fn: Callable[[AccessControl], T]) -> T:
        """`fn` on the lab's etcd as its root user, who alone may change users and roles."""
        access = lab_state.lab_datastore(state)
        root = Login("root", self._root_password_file()) if state["etcd"].get("rbac") else None

        def call(store: Datastore) -> T:
            assert isinstance(store, AccessControl), store.url
            return fn(store)

        return self._with_store_as(access.url, access.tls, root, call)

    # -- certificates and users -----------------------------------------------------------
    # A small CA made at `lab up` (lab/pki.py). The CA key, etcd's key and the root password stay
    # in pki/; each agent gets its own certificate, key and etcd user in its node's directory,
    # the CLI the admin's in admin/.

    def _authority(self) -> pki.Authority:
        directory = lab_state.pki_dir(self.name)
        return pki.Authority(cert=os.path.join(directory, "ca.crt"), key=os.path.join(directory, "ca.key"))

    def _root_password_file(self) -> str:
        return os.path.join(lab_state.pki_dir(self.name), "root.password")

    def _etcd_tls(self) -> ServerTls:
        directory = lab_state.pki_dir(self.name)
        return ServerTls(
            client_ca=os.path.join(directory, "ca.crt"),
            cert=os.path.join(directory, "etcd.crt"),
            key=os.path.join(directory, "etcd.key"),
        )

    def _make_pki(self, etcd_address: str) -> None:
        """The CA, etcd's server certificate, the admin's client files and the root password."""
        ca = pki.make_authority(lab_state.pki_dir(self.name), f"tulle lab {self.name}")
        server = self._etcd_tls()
        # No Common Name: the gateway calls etcd with this certificate (see lab/pki.py).
        pki.issue(ca, server.cert, server.key, f"/O=tulle/OU=etcd {self.name}", server_ip=etcd_address)
        pki.client_files(ca, lab_state.admin_dir(self.name), "/O=tulle/OU=admin")
        pki.write_secret(os.path.join(lab_state.admin_dir(self.name), "password"), pki.new_password())
        pki.write_secret(self._root_password_file(), pki.new_password())

    def _enable_access_control(self, state: dict[str, Any]) -> None:
        _, admin = lab_state.credentials_in(lab_state.admin_dir(self.name), lab_state.ADMIN_USER)
        assert admin is not None
        root_password, admin_password = _read_secret(self._root_password_file()), _read_secret(admin.password_file)
        user = admin.user
        self._with_access_control(state, lambda store: store.enable_access_control(root_password, user, admin_password))
        state["etcd"]["rbac"] = True

    def agent_credentials(self, node: str) -> tuple[TlsFiles, Login]:
        """The files node's agent reaches etcd with: in its node's directory, never the CA key."""
        tls, login = lab_state.credentials_in(os.path.join(self.node_dir(node), "datastore"), f"tulle-agent.{node}")
        assert login is not None
        return tls, login

    def _make_agent_credentials(self, state: dict[str, Any], node: str) -> None:
        tls, login = self.agent_credentials(node)
        pki.client_files(self._authority(), os.path.dirname(tls.cert), f"/O=tulle/OU=agent {node}")
        password = pki.new_password()
        pki.write_secret(login.password_file, password)
        user = self._with_access_control(state, lambda store: store.add_agent_user(node, password))
        assert user == login.user, (user, login.user)

    def renew_agent_certificate(self, node: str, days: int = pki.DAYS) -> None:
        """Give node's agent a new key and certificate by replacing its files, as an operator
        rotates them; the agent takes them up with its next connection, without a restart."""
        tls, _ = self.agent_credentials(node)
        cert, key = f"{tls.cert}.new", f"{tls.key}.new"
        pki.issue(self._authority(), cert, key, f"/O=tulle/OU=agent {node}", days=days)
        os.replace(key, tls.key)
        os.replace(cert, tls.cert)

    # -- up and down ------------------------------------------------------------------------

    def up(
        self,
        nodes: int,
        mode: str,
        ipv4_only: bool = False,
        lease_ttl: int = 15,
        node_grace: float = 60.0,
        progress: Callable[[str], None] = lambda _m: None,
        resync: float | None = None,
        connection_limit: int | None = None,
        source_verification: bool = True,
        kubernetes: bool = False,
    ) -> dict[str, Any]:
        if not 1 <= nodes <= topology.MAX_NODE_INDEX:
            raise LabError(f"nodes: a lab has 1 to {topology.MAX_NODE_INDEX} nodes, not {nodes}")
        if self.exists():
            raise LabExists(f"lab {self.name!r} exists already")
        if not os.path.exists(os.path.join(CNI_BIN_DIR, "tulle")):
            raise LabError(f"the CNI plugin is not built ({CNI_BIN_DIR}/tulle): run `make cni`")
        os.makedirs(self.dir, exist_ok=True)
        state: dict[str, Any] = {
            "name": self.name,
            "mode": mode,
            "ipv4Only": ipv4_only,
            "created": time.time(),
            "underlay": {"netns": self.names.underlay},
            "agent": {
                "leaseTtl": lease_ttl,
                "nodeGrace": node_grace,
                "resync": resync,
                "connectionLimit": connection_limit,
                "sourceVerification": source_verification,
            },
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
            progress("certificates")
            etcd_address = f"{topology.subnet_v4(1)}.1"
            self._make_pki(etcd_address)
            progress("etcd")
            server = self._launch_etcd(state, f"https://{etcd_address}:{ETCD_PORT}", self._etcd_data_dir())
            state["etcd"] = {"pid": server.pid, "url": server.url, "dataDir": server.data_dir}
            lab_state.save(self.name, state)
            self._enable_access_control(state)
            lab_state.save(self.name, state)
            families = [4] if ipv4_only else [4, 6]
            self.with_store(state, lambda store: self._create_pools(store, families))
            names = [f"node{state['nextIndex'] + i}" for i in range(nodes)]
            for node in names:
                self._reserve_node(state, node)
            lab_state.save(self.name, state)
            progress(f"{nodes} nodes")
            # Nodes are made side by side: each is a few `ip` commands and an agent process, and
            # a 100-node lab made one by one spends most of its time waiting on them.
            with ThreadPoolExecutor(max_workers=min(8, nodes)) as pool:
                list(pool.map(lambda n: self._make_node(state, n), names))
            lab_state.save(self.name, state)
            progress("waiting for the agents")
            ready_within = 60.0 + nodes  # the agents start together on few cores
            with ThreadPoolExecutor(max_workers=min(16, nodes)) as pool:
                list(pool.map(lambda n: self.wait_agent_ready(state, n, timeout=ready_within), names))
            if kubernetes:
                from tulle.lab import kubernetes as lab_kubernetes

                lab_kubernetes.up(self, state, progress)
        except BaseException:
            lab_state.save(self.name, state)
            raise
        return state

    @staticmethod
    def _create_pools(store: Datastore, families: list[int]) -> None:
        _apply(store, [pool_object(*DEFAULT_POOLS[family]) for family in families])

    def exists(self) -> bool:
        """Whether anything of the lab is on this machine: its folder, or a namespace named after it."""
        return os.path.isdir(self.dir) or bool(topology.lab_namespaces(self.name))

    def down(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        """Stop every process of the lab by PID and remove everything it made: first its own
        processes, each with its clean shutdown, then any other that runs in one of its namespaces
        (started with `lab exec` and left running), then the namespaces, podman's included."""
        try:
            state = lab_state.load(self.name)
        except lab_state.LabNotFound:
            state = {}
        podman_namespaces = self._podman_namespaces(state)  # before `podman rm` unlinks them
        named = [f"/run/netns/{ns}" for ns in topology.lab_namespaces(self.name)]
        with HeldNamespaces([*named, *podman_namespaces]) as held:
            if state.get("kubernetes"):
                from tulle.lab import kubernetes as lab_kubernetes

                lab_kubernetes.down(self.dir, state, progress)  # pods, kubelets, containerd, control plane
            self._stop_own_processes(state, progress)
            progress("processes left in the lab's namespaces")
            stop_processes_in(held.ids)
            progress("namespaces")
            for ns in topology.lab_namespaces(self.name):
                topology.del_netns(ns)
            for path in podman_namespaces:
                topology.del_netns(os.path.basename(path))
        shutil.rmtree(self.dir, ignore_errors=True)

    def _podman_namespaces(self, state: dict[str, Any]) -> list[str]:
        """The namespaces podman made for the lab's containers (/run/netns/netns-<uuid>): those the
        lab recorded, and those linked to one of its namespaces, which no record may name (a lost
        lab.json, a command killed halfway)."""
        recorded = [
            str(pod["netns"])
            for pod in state.get("pods", {}).values()
            if pod.get("runtime") == "podman"
            and os.path.basename(str(pod.get("netns", ""))).startswith(PODMAN_NETNS_PREFIX)
        ]
        linked = [
            f"/run/netns/{podman_ns}"
            for ns in topology.lab_namespaces(self.name)
            for podman_ns in podman_namespaces_linked_to(ns)
        ]
        return sorted({*recorded, *linked})

    def _stop_own_processes(self, state: dict[str, Any], progress: Callable[[str], None]) -> None:
        """The processes the lab started: pod servers, agents and etcd by the PIDs it recorded, and
        every podman container of every node that has podman's storage, recorded or not (podman
        also unmounts what it mounted for them)."""
        for key, pod in sorted(state.get("pods", {}).items()):
            if pod.get("server"):
                progress(f"server of pod {key}")
                _stop_pod_server(pod)
        for node_name in self._nodes_with_podman():
            progress(f"podman containers on {node_name}")
            node_dir = self.node_dir(node_name)
            Podman(node_dir, self.names.node(node_name), os.path.join(node_dir, "cni"), CNI_PATH).remove_all()
        for node_name, node in sorted(state.get("nodes", {}).items()):
            if node.get("pid"):
                progress(f"agent {node_name}")
                _stop(node["pid"], expect="tulle")
        if state.get("etcd", {}).get("pid"):
            progress("etcd")
            _stop(state["etcd"]["pid"], expect="etcd")

    def _nodes_with_podman(self) -> list[str]:
        """The nodes whose folder holds podman's configuration: podman ran there."""
        nodes_dir = os.path.join(self.dir, "nodes")
        try:
            nodes = os.listdir(nodes_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in nodes if os.path.exists(os.path.join(nodes_dir, n, "podman", "containers.conf")))

    # -- nodes ------------------------------------------------------------------------------

    def node_dir(self, node: str) -> str:
        return os.path.join(self.dir, "nodes", node)

    def agent_socket(self, node: str) -> str:
        return os.path.join(self.node_dir(node), "agent.sock")

    def agent_log(self, node: str) -> str:
        """The file node's agent writes its output to (`tulle lab logs LAB NODE`); an agent started
        again appends to it. It goes with its node (`lab node del`) or its lab (`lab down`)."""
        return os.path.join(self.node_dir(node), "agent.log")

    def _add_node(self, state: dict[str, Any], node: str) -> None:
        self._reserve_node(state, node)
        lab_state.save(self.name, state)
        self._make_node(state, node)
        lab_state.save(self.name, state)

    def _reserve_node(self, state: dict[str, Any], node: str) -> None:
        """The node's place in the lab (index, subnet, namespace name), in the state only."""
        if not topology.NODE_RE.match(node):
            raise LabError(f"node name {node!r} must be lowercase letters, digits and '-', starting with a letter")
        if node in state["nodes"]:
            raise LabError(f"node {node} exists already in lab {self.name}")
        index = state["nextIndex"]
        state["nextIndex"] = index + 1
        subnet = _subnet_for(index, state["mode"])
        state["nodes"][node] = {"index": index, "subnet": subnet, "netns": self.names.node(node)}

    def _make_node(self, state: dict[str, Any], node: str) -> None:
        """A reserved node made real: its namespace and uplink, its CNI configuration, its agent.
        Touches only its own record, so several can be made at once."""
        record = state["nodes"][node]
        v4, v6 = topology.create_node(self.names, node, record["index"], record["subnet"])
        record["addresses"] = [v4, v6]
        node_dir = self.node_dir(node)
        os.makedirs(node_dir, exist_ok=True)
        conf_dir = os.path.join(node_dir, "cni")
        write_conflist(conf_dir, conflist(NETWORK, self.agent_socket(node), os.path.join(node_dir, "state")))
        self._make_agent_credentials(state, node)
        record["pid"] = self._start_agent(state, node)

    def _start_agent(self, state: dict[str, Any], node: str) -> int:
        node_dir = self.node_dir(node)
        tls, login = self.agent_credentials(node)
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
            "--datastore-ca",
            tls.ca,
            "--datastore-cert",
            tls.cert,
            "--datastore-key",
            tls.key,
            "--datastore-user",
            login.user,
            "--datastore-password-file",
            login.password_file,
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
        if state["agent"].get("connectionLimit"):
            cmd += ["--max-connections-per-pod", str(state["agent"]["connectionLimit"])]
        if state["agent"].get("sourceVerification") is False:
            cmd += ["--source-verification", "off"]
        if state["agent"].get("resync"):
            resync = float(state["agent"]["resync"])
            # Reading the kernel back is the expensive part of the periodic work: never more
            # often than the agent's default, and as rarely as the resync when that is rarer.
            cmd += ["--resync", str(resync), "--verify-interval", str(max(resync, 90.0))]
        with open(self.agent_log(node), "ab") as log:
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

    def wait_agent_ready(
        self, state: dict[str, Any], node: str, timeout: float = 60.0, datastore_patience: float | None = None
    ) -> None:
        """Until the node's agent says it is ready; a LabError if it exits or is not ready within
        `timeout`. With `datastore_patience`, also once it is not ready after that many seconds and
        the lab's etcd does not answer either: an agent cannot get ready without it, and a stopped
        etcd is not brought back by waiting (one node's command says so at once; `lab up` waits)."""
        started = time.monotonic()
        deadline = started + timeout
        next_probe = started + (datastore_patience if datastore_patience is not None else timeout)
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
            if time.monotonic() >= next_probe:
                problem = self._etcd_problem(state)
                if problem:
                    raise LabError(f"the agent of {node} runs (pid {pid}) but cannot get ready: {problem}")
                next_probe = time.monotonic() + 2.0
            time.sleep(0.1)
        raise LabError(f"the agent of {node} is not ready after {timeout:.0f} s ({last}); see its agent.log")

    def _etcd_problem(self, state: dict[str, Any]) -> str:
        """'' if the lab's etcd answers; otherwise why not, with its URL."""
        try:
            self.with_store(state, lambda store: store.get(NAMESPACE, "default"), timeout=2.0)
        except DatastoreError as exc:
            return str(exc)
        return ""

    # An agent is stopped and started under a lock of its own (two restarts at once would leave
    # two agents on one node); the lab-wide lock is held only to write the PID, so a pod add
    # waiting a minute on a stuck agent delays neither this nor anything else.

    def _agent_pid(self, node: str) -> int:
        record = lab_state.load(self.name)["nodes"].get(node)
        if record is None:
            raise LabError(f"lab {self.name} has no node {node}")
        return int(record.get("pid") or 0)

    def _spawn_agent(self, node: str) -> int:
        with lab_state.locked(self.name) as state:
            record = state["nodes"].get(node)
            if record is None:
                raise LabError(f"lab {self.name} has no node {node}")
            record["pid"] = self._start_agent(state, node)
            return int(record["pid"])

    def restart_agent(self, node: str) -> int:
        """Stop the node's agent by PID and start it again; pods stay as they are."""
        with lab_state.exclusive(self.name, f"agent-{node}"):
            pid = self._agent_pid(node)
            if pid:
                _stop(pid, expect="tulle")
            pid = self._spawn_agent(node)
        self.wait_agent_ready(lab_state.load(self.name), node, datastore_patience=DATASTORE_PATIENCE_S)
        return pid

    def stop_agent(self, node: str) -> None:
        with lab_state.exclusive(self.name, f"agent-{node}"):
            pid = self._agent_pid(node)
            if pid:
                _stop(pid, expect="tulle")
            with lab_state.locked(self.name) as state:
                if node in state["nodes"]:
                    state["nodes"][node]["pid"] = 0

    def start_agent(self, node: str) -> int:
        with lab_state.exclusive(self.name, f"agent-{node}"):
            pid = self._agent_pid(node)
            if pid and pid_alive(pid):
                return pid
            pid = self._spawn_agent(node)
        self.wait_agent_ready(lab_state.load(self.name), node, datastore_patience=DATASTORE_PATIENCE_S)
        return pid

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
        """The node goes away as a machine does: its agent stops, its namespace and its pods'
        (with their servers) vanish, its Node object is deleted; the other nodes drop their routes
        to it at once. Its Pod objects stay, shown lost (`tulle get po`: Unknown), until the agents
        delete them with their endpoints and the node's blocks after the grace period
        (`--node-grace`), as Kubernetes' pod garbage collector does. The lab keeps its records of
        those pods, marked `nodeRemoved`, until `tulle lab pod del` (or `lab down`) clears them."""
        with lab_state.exclusive(self.name, f"agent-{node}"), lab_state.locked(self.name) as state:
            record = state["nodes"].get(node)
            if record is None:
                raise LabError(f"lab {self.name} has no node {node}")
            for key, pod in list(state["pods"].items()):
                if pod["node"] != node or pod.get("nodeRemoved"):
                    continue
                _stop_pod_server(pod)
                if pod.get("runtime") == "podman":
                    self._podman(record, node).remove(pod["container"])
                elif pod.get("netns"):
                    topology.del_netns(os.path.basename(pod["netns"]))
                if pod.get("phase"):
                    # Being added or deleted by another command: out of the books, so that an
                    # add fails rather than records a pod on a node that is gone.
                    del state["pods"][key]
                    _owe_pod_delete(state, key)
                else:
                    pod["nodeRemoved"] = True
            if record.get("pid"):
                _stop(record["pid"], expect="tulle")
            topology.delete_node(self.names, node, record["index"])
            self.with_store(state, lambda store: store.delete(NODE, node))
            self._with_access_control(state, lambda store: store.remove_agent_user(node))
            shutil.rmtree(self.node_dir(node), ignore_errors=True)
            del state["nodes"][node]
        self._retry_pod_deletes(timeout=5.0)  # the Pod objects of pods that were being added

    # -- etcd -------------------------------------------------------------------------------
    # Stopped, started, paused and resumed by PID under a lock of its own, so that faults of the
    # datastore can be made and shown; its data directory is kept, so nothing is lost.

    def _etcd_data_dir(self) -> str:
        return os.path.join(self.dir, "etcd")

    def _launch_etcd(self, state: dict[str, Any], url: str, data_dir: str) -> EtcdServer:
        """etcd over TLS, trusting the lab's CA for clients; probed as the admin once RBAC is on."""
        parts = urlsplit(url)
        assert parts.hostname is not None, url
        admin_tls, admin_login = lab_state.credentials_in(lab_state.admin_dir(self.name), lab_state.ADMIN_USER)
        try:
            return launch_etcd(
                data_dir=data_dir,
                client_host=parts.hostname,
                client_port=parts.port or ETCD_PORT,
                peer_port=ETCD_PEER_PORT,
                log_path=os.path.join(self.dir, "etcd.log"),
                netns=self.names.underlay,
                name=f"{self.name}-etcd",
                server_tls=self._etcd_tls(),
                client_tls=admin_tls,
                login=admin_login if state.get("etcd", {}).get("rbac") else None,
            )
        except RuntimeError as exc:
            raise LabError(str(exc)) from exc

    def _etcd_pid(self) -> int:
        return int(lab_state.load(self.name).get("etcd", {}).get("pid") or 0)

    def stop_etcd(self) -> None:
        """Stop the lab's etcd by PID, keeping its data: clients get their connections refused."""
        with lab_state.exclusive(self.name, "etcd"):
            pid = self._etcd_pid()
            if pid:
                _stop(pid, expect="etcd")
            with lab_state.locked(self.name) as state:
                state["etcd"]["pid"] = 0

    def start_etcd(self) -> int:
        """Start the lab's etcd again, on the same URL and data directory, and wait until it answers;
        then delete the Pod objects that pod deletes owe. A paused etcd is resumed."""
        with lab_state.exclusive(self.name, "etcd"):
            state = lab_state.load(self.name)
            pid = int(state["etcd"].get("pid") or 0)
            found = _process_state(pid, "etcd")
            if found == "paused":
                _signal(pid, signal.SIGCONT, "etcd")
            elif found == "stopped":
                server = self._launch_etcd(
                    state, state["etcd"]["url"], state["etcd"].get("dataDir") or self._etcd_data_dir()
                )
                pid = server.pid
                with lab_state.locked(self.name) as now:
                    now["etcd"]["pid"] = pid
        self._retry_pod_deletes(timeout=5.0)
        return pid

    def pause_etcd(self) -> None:
        """SIGSTOP etcd: it keeps its sockets but answers nothing, so clients wait out their
        timeouts (a hung datastore, where a stopped one refuses connections at once)."""
        with lab_state.exclusive(self.name, "etcd"):
            if not _signal(self._etcd_pid(), signal.SIGSTOP, "etcd"):
                raise LabError(f"the etcd of lab {self.name} is not running")

    def resume_etcd(self) -> None:
        """SIGCONT a paused etcd."""
        with lab_state.exclusive(self.name, "etcd"):
            if not _signal(self._etcd_pid(), signal.SIGCONT, "etcd"):
                raise LabError(f"the etcd of lab {self.name} is not running")
        self._retry_pod_deletes(timeout=5.0)

    # -- pods -------------------------------------------------------------------------------
    # The lab-wide lock is held only for short read-modify-write steps of lab.json: a pod's key
    # is reserved ("adding", "deleting") under the lock, the CNI ADD or DEL (which can wait up to
    # a minute on a stuck agent) and podman run without it, and the result is recorded under it.
    # A reservation carries a token (is it still ours?) and its owner process (is it stale?).

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
        serve: bool = False,
    ) -> dict[str, Any]:
        """Add a pod as a kubelet does: the Pod object, the sandbox's network (CNI ADD, or podman
        run), then the Pod's status. A failed add leaves nothing in the books: what it made is
        undone, and a Pod object that cannot be deleted yet is owed. With `serve`, a small
        server in the pod answers on its declared TCP and UDP ports with the pod's name."""
        if runtime not in ("cni", "podman"):
            raise LabError(f"--runtime must be cni or podman, not {runtime!r}")
        if runtime == "podman" and namespace != "default":
            raise LabError("podman passes no K8S_POD_NAMESPACE, so podman pods live in namespace 'default'")
        try:
            served = served_ports(ports) if serve else []
        except ServeError as exc:
            raise LabError(str(exc)) from None
        key = f"{namespace}/{pod}"
        self._retry_pod_deletes()
        token = uuid.uuid4().hex
        state, record, entry = self._reserve_pod(node, namespace, pod, runtime, token)
        undo: list[Callable[[], None]] = []
        wrote_pod = False
        try:
            conf = self._conflist(node)
            wrote_pod = True  # before the write: one that timed out may still have landed
            try:
                self.with_store(state, lambda store: _write_pod_object(store, node, namespace, pod, labels, ports))
            except (AdmissionError, AdmissionErrors):
                wrote_pod = False  # refused whole: a Pod of that name that was there is not ours to delete
                raise
            if runtime == "cni":
                self._add_pod_network(record, conf, entry, undo)
            else:
                self._start_podman_pod(record, node, pod, entry, undo)
            entry["ips"] = self._pod_addresses(entry["netns"])
            if served:
                self._start_pod_server(namespace, pod, entry, served, undo)
            host_ip = record["addresses"][0]
            self.with_store(state, lambda store: _mark_running(store, namespace, pod, entry["ips"], host_ip))
            self._record_added_pod(key, token, entry)
        except BaseException:
            _undo(undo)
            deleted = not wrote_pod or self._delete_pod_object(state, namespace, pod)
            self._strike(key, token, pod_object_deleted=deleted)
            raise
        out: dict[str, Any] = {"pod": key, "node": node, "ips": entry["ips"]}
        if served:
            out["serving"] = [f"{number}/{protocol}" for protocol, number in served]
        return out

    def _start_pod_server(
        self,
        namespace: str,
        pod: str,
        entry: dict[str, Any],
        ports: list[tuple[str, int]],
        undo: list[Callable[[], None]],
    ) -> None:
        """The pod's server in its namespace, recorded in its entry by PID; its stop goes on `undo`."""
        log_dir = os.path.join(self.dir, "pods")
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, f"{namespace}.{pod}.serve.log")
        try:
            pid = start_pod_server(entry["netns"], pod, ports, log_path)
        except ServeError as exc:
            raise LabError(str(exc)) from None
        entry["server"] = {"pid": pid, "ports": [list(p) for p in ports], "log": log_path}
        undo.append(lambda: _stop_pod_server(entry))

    def _reserve_pod(
        self, node: str, namespace: str, pod: str, runtime: str, token: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Reserve the pod's key in the books (phase "adding"); (lab state, node record, pod entry)."""
        key = f"{namespace}/{pod}"
        with lab_state.locked(self.name) as state:
            if not state:
                raise lab_state.LabNotFound(f"there is no lab named {self.name!r}")
            record = state["nodes"].get(node)
            if record is None:
                raise LabError(f"lab {self.name} has no node {node} (nodes: {', '.join(sorted(state['nodes']))})")
            if key in state["pods"]:
                phase = state["pods"][key].get("phase")
                busy = f" (being {'added' if phase == 'adding' else 'deleted'})" if phase else ""
                if state["pods"][key].get("nodeRemoved"):
                    busy = f" (its node was removed; `tulle lab pod del {self.name} {key}` clears it)"
                raise LabError(f"pod {key} exists already in lab {self.name}{busy}")
            entry: dict[str, Any] = {"node": node, "runtime": runtime, "ifname": "eth0"}
            if runtime == "cni":
                entry["netns"] = f"/run/netns/{self.names.pod(namespace, pod)}"
                entry["containerID"] = uuid.uuid4().hex
                entry["args"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"
            else:
                entry["container"] = pod
                # Under the lock: quick once made, and two adds must not make it at once.
                make_rootfs(os.path.join(self.dir, "rootfs"))
            state["pods"][key] = dict(entry, phase="adding", owner=_owner(), reservation=token)
            # The Pod object is written afresh: a delete still owed for the name must not remove it later.
            _forget_pod_delete(state, key)
        return state, record, entry

    def _add_pod_network(
        self, record: dict[str, Any], conf: dict[str, Any], entry: dict[str, Any], undo: list[Callable[[], None]]
    ) -> None:
        """The pod's netns and a CNI ADD into it, as a kubelet's runtime does; their undoing goes on `undo`."""
        netns = os.path.basename(entry["netns"])
        topology.add_netns(netns)
        undo.append(lambda: topology.del_netns(netns))
        cni = CniRuntime(CNI_PATH, f"/run/netns/{record['netns']}")
        result = cni.add(conf, entry["containerID"], entry["netns"], "eth0", entry["args"])
        # A runtime that cannot go on after a successful ADD gives back what it took.
        undo.append(lambda: cni.delete(conf, entry["containerID"], entry["netns"], "eth0", entry["args"], result))
        entry["result"] = result

    def _start_podman_pod(
        self, record: dict[str, Any], node: str, pod: str, entry: dict[str, Any], undo: list[Callable[[], None]]
    ) -> None:
        """A podman container on the node's network (podman runs the CNI ADD); its removal goes on `undo`."""
        podman = self._podman(record, node)
        undo.append(lambda: podman.remove(pod))
        info = podman.start(pod, NETWORK, os.path.join(self.dir, "rootfs"))
        entry["containerID"] = info["Id"]
        entry["netns"] = info["NetworkSettings"]["SandboxKey"]
        entry["result"] = None

    def _record_added_pod(self, key: str, token: str, entry: dict[str, Any]) -> None:
        with lab_state.locked(self.name) as now:
            if now.get("pods", {}).get(key, {}).get("reservation") != token:
                raise LabError(f"pod {key} was removed from lab {self.name} while it was being added")
            now["pods"][key] = entry

    def _delete_pod_object(self, state: dict[str, Any], namespace: str, pod: str, timeout: float = 3.0) -> bool:
        """Delete the Pod object; False if the datastore did not answer (the delete is then owed)."""
        try:
            self.with_store(state, lambda store: store.delete(POD, pod, namespace), timeout=timeout)
        except Exception:  # whatever kept it from etcd, a later command tries again
            return False
        return True

    def _strike(self, key: str, token: str, pod_object_deleted: bool) -> None:
        """Take a reserved pod out of the books; remember its Pod object if it could not be deleted."""
        with lab_state.locked(self.name) as state:
            pods = state.get("pods", {})
            if pods.get(key, {}).get("reservation") == token:
                del pods[key]
            # A pod added again under the name since owns the Pod object now: nothing is owed.
            if not pod_object_deleted and key not in pods:
                _owe_pod_delete(state, key)

    def _retry_pod_deletes(self, timeout: float = 2.0) -> None:
        """Delete the Pod objects that earlier deletes owe, if etcd answers now; never fails or
        holds up a command for longer than the timeout.

        The deletes run under the lab-wide lock: a pod added again under the same name meanwhile
        must not lose its new Pod object to the old delete (an add forgets the owed delete under
        the same lock). The short timeout bounds how long the lock is held."""
        try:
            state = lab_state.load(self.name)
            if not state.get("pendingPodDeletes") or _process_state(self._etcd_pid(), "etcd") != "running":
                return
            with lab_state.locked(self.name) as now:
                owed = [k for k in now.get("pendingPodDeletes", []) if k not in now.get("pods", {})]
                done: list[str] = []

                def delete_owed(store: Datastore) -> None:
                    for key in owed:
                        namespace, _, pod = key.partition("/")
                        store.delete(POD, pod, namespace)
                        done.append(key)

                try:
                    self.with_store(now, delete_owed, timeout=timeout)
                except Exception:
                    pass  # still away: what is left stays owed
                left = [k for k in now.get("pendingPodDeletes", []) if k in owed and k not in done]
                if left:
                    now["pendingPodDeletes"] = left
                else:
                    now.pop("pendingPodDeletes", None)
        except Exception:
            pass  # a retry is a courtesy of this command; its failure is not the command's

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
        """Delete a pod as a kubelet does: the sandbox's network (CNI DEL, or podman rm), then the
        Pod object. Once the DEL has succeeded and the namespace is gone, so is the pod, whatever
        the datastore says (the agent defers the address release when etcd is away, the plugin
        the whole DEL when the agent is): a Pod object that cannot be deleted now is owed. A pod
        whose node was removed has no network left: its record and Pod object go."""
        key = f"{namespace}/{pod}"
        self._retry_pod_deletes()
        token = uuid.uuid4().hex
        with lab_state.locked(self.name) as state:
            if not state:
                raise lab_state.LabNotFound(f"there is no lab named {self.name!r}")
            entry = state.get("pods", {}).get(key)
            if entry is None:
                raise LabError(f"lab {self.name} has no pod {key}")
            phase = entry.get("phase")
            if phase and _owner_alive(entry.get("owner", "")):
                doing = "added" if phase == "adding" else "deleted"
                raise LabError(f"pod {key} is being {doing} by another command; try again when it is done")
            # A reservation whose owner died (a killed `lab pod add`) is deleted like a pod.
            before = {k: v for k, v in entry.items() if k != "server"}  # stopped first, whatever follows
            state["pods"][key] = dict(entry, phase="deleting", owner=_owner(), reservation=token)
            record = None if entry.get("nodeRemoved") else state["nodes"].get(entry["node"])
        try:
            _stop_pod_server(entry)
            if record is None:
                pass  # its node went with its network: the books and the Pod object are what is left
            elif entry["runtime"] == "podman":
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
        except BaseException:
            # The DEL failed: the pod is still there as it was, for the runtime (the user) to retry.
            with lab_state.locked(self.name) as now:
                if now.get("pods", {}).get(key, {}).get("reservation") == token:
                    now["pods"][key] = before
            raise
        self._strike(key, token, pod_object_deleted=self._delete_pod_object(state, namespace, pod))

    def pod_netns(self, namespace: str, pod: str) -> str:
        state = lab_state.load(self.name)
        entry = state.get("pods", {}).get(f"{namespace}/{pod}")
        if entry is None or entry.get("phase"):
            raise LabError(f"lab {self.name} has no pod {namespace}/{pod}")
        if entry.get("nodeRemoved"):
            raise LabError(
                f"pod {namespace}/{pod} was on node {entry['node']}, which was removed; "
                f"`tulle lab pod del {self.name} {namespace}/{pod}` clears it"
            )
        return str(entry["netns"])

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The lab as it is: a pod is listed once added and while its namespace exists (a pod
        whose namespace is gone is gone, whatever lab.json says); processes as the kernel sees them."""
        self._retry_pod_deletes(timeout=1.0)
        state = lab_state.load(self.name)
        nodes = []
        for name, record in sorted(state["nodes"].items(), key=lambda kv: kv[1]["index"]):
            agent = _process_state(int(record.get("pid") or 0), "tulle")
            nodes.append(
                {
                    "name": name,
                    "netns": record["netns"],
                    "addresses": record.get("addresses", []),
                    "subnet": record["subnet"],
                    "agent": {"pid": record.get("pid"), "running": agent != "stopped", "state": agent},
                }
            )
        pods: list[dict[str, Any]] = []
        busy: list[dict[str, Any]] = []
        gone: list[str] = []
        orphaned: list[dict[str, Any]] = []
        for key, p in sorted(state["pods"].items()):
            if p.get("phase"):
                stale = not _owner_alive(p.get("owner", ""))
                busy.append({"pod": key, "node": p["node"], "phase": p["phase"], "stale": stale})
            elif p.get("nodeRemoved"):
                orphaned.append({"pod": key, "node": p["node"]})
            elif not os.path.exists(p["netns"]):
                gone.append(key)
            else:
                pods.append(
                    {
                        "pod": key,
                        "node": p["node"],
                        "ips": p.get("ips", []),
                        "runtime": p["runtime"],
                        "netns": p["netns"],
                        "serving": _pod_server_status(p),
                    }
                )
        etcd = state.get("etcd", {})
        return {
            "name": self.name,
            "mode": state["mode"],
            "etcd": etcd.get("url"),
            "etcdServer": {
                "url": etcd.get("url"),
                "pid": etcd.get("pid"),
                "state": _process_state(int(etcd.get("pid") or 0), "etcd"),
            },
            "nodes": nodes,
            "pods": pods,
            "podsInProgress": busy,
            "podsGone": gone,
            "podsOfRemovedNodes": orphaned,
            "pendingPodDeletes": list(state.get("pendingPodDeletes", [])),
            "external": state.get("external", {}),
        }


def _write_pod_object(
    store: Datastore, node: str, namespace: str, pod: str, labels: dict[str, str], ports: list[dict[str, Any]]
) -> None:
    """The Pod object, scheduled on `node`, and its Namespace if there is none yet."""
    objects: list[Obj] = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "main", "image": "busybox", "ports": ports}],
            },
        }
    ]
    if store.get(NAMESPACE, namespace) is None:
        objects.insert(0, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    _apply(store, objects)


def _read_secret(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _undo(steps: list[Callable[[], None]]) -> None:
    """Undo what a failed add made, last step first."""
    for step in reversed(steps):
        try:
            step()
        except Exception:
            pass  # the error that stopped the add is the one to report, not a clean-up's


def _owe_pod_delete(state: dict[str, Any], key: str) -> None:
    state["pendingPodDeletes"] = sorted({*state.get("pendingPodDeletes", []), key})


def _forget_pod_delete(state: dict[str, Any], key: str) -> None:
    left = [k for k in state.get("pendingPodDeletes", []) if k != key]
    if left:
        state["pendingPodDeletes"] = left
    else:
        state.pop("pendingPodDeletes", None)


# -- processes, by PID ------------------------------------------------------------------------


def _process_state(pid: int, expect: str) -> str:
    """'running', 'paused' (SIGSTOP) or 'stopped'."""
    if not runs_as(pid, expect):
        return "stopped"
    try:
        with open(f"/proc/{pid}/stat") as f:
            letter = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "stopped"
    return "paused" if letter in ("T", "t") else "running"


def _signal(pid: int, sig: signal.Signals, expect: str) -> bool:
    if not runs_as(pid, expect):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _stop(pid: int, expect: str) -> None:
    """stop_pid, after a SIGCONT: a paused process acts on SIGTERM only once it runs again, and
    would otherwise be stopped by SIGKILL, without its clean shutdown, after stop_pid's wait."""
    _signal(pid, signal.SIGCONT, expect)
    stop_pid(pid, expect=expect)


def _stop_pod_server(entry: dict[str, Any]) -> None:
    """Stop the pod's `--serve` server by its PID, before its namespace goes (a process in a
    network namespace keeps the namespace alive after its name is deleted)."""
    pid = int((entry.get("server") or {}).get("pid") or 0)
    if pid:
        _stop(pid, expect=POD_SERVER)


def _pod_server_status(entry: dict[str, Any]) -> dict[str, Any] | None:
    """What `lab status` shows of a pod's server: its PID, ports and whether it runs."""
    server = entry.get("server")
    if not server:
        return None
    ports = [f"{number}/{protocol}" for protocol, number in server.get("ports", [])]
    return {"pid": server.get("pid"), "ports": ports, "state": _process_state(int(server.get("pid") or 0), POD_SERVER)}


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, IndexError):
        return ""


def _owner() -> str:
    """This process as the owner of a reservation: PID and start time (a PID alone is reused)."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    return pid.isdigit() and pid_alive(int(pid)) and _start_time(int(pid)) == started


def _mark_running(store: Datastore, namespace: str, pod: str, ips: list[str], host_ip: str) -> None:
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


def _apply(store: Datastore, objects: list[Obj]) -> None:
    """Create or replace the objects, defaulted and checked as `tulle apply` does them."""
    from tulle.model.validation import admit_all

    assert isinstance(store, AtomicWriter), store.url
    store.apply_many(objects, admit=admit_all)


__all__ = ["Lab", "LabError", "TopologyError"]
