"""The lab as a `tulle.connectivity.cluster.ProbeCluster`: a thin adapter over `Lab`.

A probe pod is a lab pod (`Lab.add_pod`: the Pod object, a CNI ADD through the node's agent); the
port it serves is an echo server of this process whose sockets were made inside the pod's network
namespace (a lab pod runs no processes of its own, and a server that lives in this process cannot
outlive it); `exec` runs the command in the pod's namespace with nsenter; the outside is the lab's
external host, which has no route to the pods. One run at a time per lab.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from tulle.connectivity.checks import ConnectivityError
from tulle.connectivity.cluster import ClusterNode, ExecResult, ExternalTarget, NamespaceContents, PodSpec, ProbePod
from tulle.connectivity.echo import EchoServer, bound_port, open_listeners
from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import AtomicWriter, Datastore
from tulle.lab import state as lab_state
from tulle.lab.cluster import Lab
from tulle.model.kinds import NAMESPACE, NETWORK_POLICY, POD
from tulle.model.validation import admit_all

EXEC_TIMED_OUT = 124  # as timeout(1) says it


class LabProbeCluster:
    """`with LabProbeCluster(Lab("demo")) as cluster: ...`; refuses a second run on the same lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._servers: dict[str, EchoServer] = {}
        self._servers_lock = threading.Lock()
        self._lock_file: Any = None

    def __enter__(self) -> LabProbeCluster:
        lab_state.load(self.lab.name)  # no lab: LabNotFound, before a lock file makes a folder
        lock = open(os.path.join(self.lab.dir, ".lock-connectivity"), "w")  # held until __exit__
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConnectivityError(f"another `tulle connectivity test` runs on lab {self.lab.name}") from None
        self._lock_file = lock
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @property
    def name(self) -> str:
        return f"lab {self.lab.name}"

    @property
    def probe_command(self) -> Sequence[str]:
        # The pod's namespace is entered with nsenter alone, so the host's Python and Tulle run there.
        return (sys.executable, "-m", "tulle.connectivity.client")

    def nodes(self) -> list[ClusterNode]:
        records = sorted(self._state()["nodes"].items(), key=lambda kv: kv[1]["index"])
        return [ClusterNode(name, _by_family(record.get("addresses", []))) for name, record in records]

    def namespace(self, name: str) -> NamespaceContents:
        def read(store: Datastore) -> tuple[Any, list[Any], list[Any]]:
            return store.get(NAMESPACE, name), store.list(POD, name)[0], store.list(NETWORK_POLICY, name)[0]

        state = self._state()
        namespace, pods, policies = self.lab.with_store(state, read)
        pod_labels: dict[str, Mapping[str, str] | None] = {p["metadata"]["name"]: _labels(p) for p in pods}
        # The lab's books know a pod whose add was cut short before its Pod object was written.
        for key in state.get("pods", {}):
            namespace_of, _, pod = key.partition("/")
            if namespace_of == name:
                pod_labels.setdefault(pod, None)
        return NamespaceContents(
            labels=_labels(namespace) if namespace is not None else None,
            pods=pod_labels,
            policies={p["metadata"]["name"]: _labels(p) for p in policies},
        )

    def create_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels)}}
        self._apply(obj)

    def delete_namespace(self, name: str) -> None:
        def delete(store: Datastore) -> None:
            assert isinstance(store, AtomicWriter), store.url
            store.delete_namespace(name)

        self.lab.with_store(self._state(), delete)

    def start_pod(self, spec: PodSpec) -> ProbePod:
        port = spec.serve_port
        ports = [{"name": f"echo-{p.lower()}", "containerPort": port, "protocol": p} for p in ("TCP", "UDP") if port]
        added = self.lab.add_pod(spec.node, spec.namespace, spec.name, dict(spec.labels), ports)
        pod = ProbePod(spec.namespace, spec.name, spec.node, tuple(added["ips"]))
        if port:
            try:
                netns = self.lab.pod_netns(spec.namespace, spec.name)
                families = sorted(_by_family(pod.addresses))
                self._serve(
                    f"{spec.namespace}/{spec.name}", run_in_netns(netns, lambda: open_listeners(port, families))
                )
            except BaseException:
                self.lab.del_pod(spec.namespace, spec.name)
                raise
        return pod

    def exec(self, pod: ProbePod, argv: Sequence[str], timeout: float) -> ExecResult:
        netns = self.lab.pod_netns(pod.namespace, pod.name)
        try:
            done = subprocess.run(
                ["nsenter", f"--net={netns}", *argv],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return ExecResult(EXEC_TIMED_OUT, "", f"killed after {timeout:g} s")
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def delete_pod(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self._stop_serving(key)
        state = self._state()
        if key in state.get("pods", {}):
            self.lab.del_pod(namespace, name)
        else:  # a Pod object without a sandbox (its add was cut short, or its delete is owed)
            self.lab.with_store(state, lambda store: store.delete(POD, name, namespace))

    def apply_policy(self, policy: Mapping[str, Any]) -> None:
        self._apply(dict(policy))

    def delete_policy(self, namespace: str, name: str) -> None:
        self.lab.with_store(self._state(), lambda store: store.delete(NETWORK_POLICY, name, namespace))

    def external_target(self) -> ExternalTarget | None:
        external = self._state().get("external")
        if not external:
            return None
        addresses = _by_family(external.get("addresses", []))
        path = f"/run/netns/{external['netns']}"
        # No fixed port: the external host is shared with whatever else the user runs there.
        listeners = run_in_netns(path, lambda: open_listeners(0, sorted(addresses)))
        self._serve("outside", listeners)
        endpoints = {family: (address, bound_port(listeners, family)) for family, address in addresses.items()}
        return ExternalTarget(endpoints, description=str(external["netns"]))

    def close(self) -> None:
        with self._servers_lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop()

    # -- inside ---------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return lab_state.load(self.lab.name)

    def _apply(self, obj: dict[str, Any]) -> None:
        def write(store: Datastore) -> None:
            assert isinstance(store, AtomicWriter), store.url
            store.apply_many([obj], admit=admit_all)

        self.lab.with_store(self._state(), write)

    def _serve(self, key: str, listeners: list[socket.socket]) -> None:
        server = EchoServer(listeners)
        server.start()
        with self._servers_lock:
            old = self._servers.pop(key, None)
            self._servers[key] = server
        if old is not None:
            old.stop()

    def _stop_serving(self, key: str) -> None:
        with self._servers_lock:
            server = self._servers.pop(key, None)
        if server is not None:
            server.stop()


def _by_family(addresses: Sequence[str]) -> dict[int, str]:
    return {ipaddress.ip_address(a).version: a for a in addresses}


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("labels") or {})
