"""A WorkloadEndpoint (tulle.dev/v1): which pod holds which addresses, on which node, through
which interface. Written by the node's agent for each pod it plumbs; read by every agent (policy
peers, address ownership) and by the CLI."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tulle.model.kinds import WORKLOAD_ENDPOINT, Obj


def handle_for(network: str, container_id: str, ifname: str) -> str:
    """The IPAM handle of one attachment: the CNI spec's key for a container's interface."""
    return f"{network}/{container_id}/{ifname}"


def endpoint_name(pod: str, handle: str) -> str:
    """The WorkloadEndpoint's name: the pod's, and a digest of the attachment.

    >>> endpoint_name("web", "tulle/abc/eth0")
    'web.dcc8a3e9'
    """
    return f"{pod}.{hashlib.sha256(handle.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class WorkloadEndpoint:
    namespace: str
    pod: str
    node: str
    network: str
    container_id: str
    ifname: str
    ips: tuple[str, ...]  # without prefix length
    host_interface: str = ""
    mac: str = ""

    @property
    def handle(self) -> str:
        return handle_for(self.network, self.container_id, self.ifname)

    @property
    def name(self) -> str:
        return endpoint_name(self.pod, self.handle)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_object(self) -> Obj:
        return {
            "apiVersion": WORKLOAD_ENDPOINT.api_version,
            "kind": WORKLOAD_ENDPOINT.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "node": self.node,
                "pod": self.pod,
                "containerID": self.container_id,
                "ifname": self.ifname,
                "network": self.network,
                "ips": list(self.ips),
                "hostInterface": self.host_interface,
                "mac": self.mac,
            },
        }

    @classmethod
    def from_object(cls, obj: Obj) -> WorkloadEndpoint:
        """Raises ValueError (or KeyError, TypeError) for an object it cannot read."""
        meta, spec = obj["metadata"], obj["spec"]
        ips = spec.get("ips") or []
        if not isinstance(ips, list) or not all(isinstance(a, str) for a in ips):
            raise ValueError("spec.ips must be a list of addresses")
        fields = [spec.get(f) for f in ("node", "pod", "network", "containerID", "ifname")]
        if not all(isinstance(f, str) and f for f in fields):
            raise ValueError("spec.node, pod, network, containerID and ifname are required strings")
        return cls(
            namespace=str(meta.get("namespace") or "default"),
            pod=str(spec["pod"]),
            node=str(spec["node"]),
            network=str(spec["network"]),
            container_id=str(spec["containerID"]),
            ifname=str(spec["ifname"]),
            ips=tuple(ips),
            host_interface=str(spec.get("hostInterface") or ""),
            mac=str(spec.get("mac") or ""),
        )
