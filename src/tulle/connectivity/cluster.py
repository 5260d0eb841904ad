"""What `tulle connectivity test` needs of a cluster, and nothing more.

The etcd lab implements it now (`tulle.lab.connectivity.LabProbeCluster`); a Kubernetes cluster
will implement it with the API server (a pod from a probe image, `exec` through the kubelet).
The checks see only this interface, so they run unchanged on either.

A probe pod runs `probe_command` (the `tulle.connectivity.client` program) through `exec`; a pod
started with a served port answers on it, over TCP and UDP and in every family it has an address
in, with the address the request came from (`tulle.connectivity.echo`): that is how a check learns
whether its traffic was translated on the way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ClusterNode:
    """A node and its own addresses (family -> address): what traffic from its pods to outside the
    cluster leaves as, once masqueraded."""

    name: str
    addresses: Mapping[int, str]


@dataclass(frozen=True)
class PodSpec:
    """A probe pod to start: where, with which labels, and the port it serves (None: none)."""

    namespace: str
    name: str
    node: str
    labels: Mapping[str, str]
    serve_port: int | None = None


@dataclass(frozen=True)
class ProbePod:
    """A started probe pod and its addresses.

    >>> ProbePod("t", "a", "node1", ("10.244.0.5", "fd00::5")).address(6)
    'fd00::5'
    """

    namespace: str
    name: str
    node: str
    addresses: tuple[str, ...]

    def address(self, family: int) -> str | None:
        return next((a for a in self.addresses if ipaddress.ip_address(a).version == family), None)


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a pod gave back."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ExternalTarget:
    """A server outside the cluster that answers as a probe pod's does (with the address it saw the
    request come from), one (address, port) per family it can be reached in. Traffic from a pod to
    it is expected to arrive from the pod's node: masquerade."""

    endpoints: Mapping[int, tuple[str, int]]
    description: str


@dataclass(frozen=True)
class NamespaceContents:
    """A namespace as the test finds it: its labels (None: there is no such namespace), and the
    labels of the pods and network policies in it (a pod's are None when the cluster knows the pod
    but has no Pod object for it, as after an add that was interrupted)."""

    labels: Mapping[str, str] | None
    pods: Mapping[str, Mapping[str, str] | None] = field(default_factory=dict)
    policies: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class ProbeCluster(Protocol):
    """A cluster as the connectivity test drives it. Errors are the cluster's own exceptions; the
    runner reports them as failed checks or stops, and cleans up."""

    @property
    def name(self) -> str:
        """How the cluster is named in the report."""
        ...

    @property
    def probe_command(self) -> Sequence[str]:
        """The command that runs `tulle.connectivity.client` inside a probe pod."""
        ...

    def nodes(self) -> list[ClusterNode]:
        """The nodes pods can be started on, in a stable order."""
        ...

    def namespace(self, name: str) -> NamespaceContents: ...

    def create_namespace(self, name: str, labels: Mapping[str, str]) -> None: ...

    def delete_namespace(self, name: str) -> None:
        """Delete the namespace (nothing if there is none)."""
        ...

    def start_pod(self, spec: PodSpec) -> ProbePod:
        """Start the pod and return once it has its addresses and serves its port."""
        ...

    def exec(self, pod: ProbePod, argv: Sequence[str], timeout: float) -> ExecResult:
        """Run argv inside the pod; a command that outlives `timeout` is killed (exit code 124)."""
        ...

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete the pod, its network and its Pod object (nothing if it is gone)."""
        ...

    def apply_policy(self, policy: Mapping[str, Any]) -> None:
        """Create or replace a NetworkPolicy, as `tulle apply` (or kubectl apply) does."""
        ...

    def delete_policy(self, namespace: str, name: str) -> None: ...

    def external_target(self) -> ExternalTarget | None:
        """Start serving outside the cluster (until `close`); None if the cluster has no outside."""
        ...

    def close(self) -> None:
        """Stop whatever this object serves; pods and objects are the runner's to delete."""
        ...
