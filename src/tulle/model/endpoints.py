"""A WorkloadEndpoint (tulle.dev/v1): which pod holds which addresses, on which node, through
which interface. Written by the node's agent for each pod it plumbs; read by every agent (policy
peers, address ownership) and by the CLI."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass

from tulle.model.kinds import WORKLOAD_ENDPOINT, Obj

# A Pod may send from these prefixes too, besides its own addresses (as Calico's
# allowedSourcePrefixes): for the few workloads that route for others. A JSON list of CIDRs.
ALLOWED_SOURCE_PREFIXES = "tulle.dev/allowed-source-prefixes"
MAX_SOURCE_PREFIXES = 64


class SourcePrefixesError(ValueError):
    """The annotation cannot be used; the message says why. It then allows nothing extra."""


def allowed_source_prefixes(annotations: object) -> tuple[str, ...]:
    """The prefixes a pod's annotations allow it to send from (none if it has no annotation).

    >>> allowed_source_prefixes({ALLOWED_SOURCE_PREFIXES: '["10.0.0.0/8", "fd00:1::/64"]'})
    ('10.0.0.0/8', 'fd00:1::/64')
    >>> allowed_source_prefixes({ALLOWED_SOURCE_PREFIXES: '["10.0.0.1/8"]'})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tulle.model.endpoints.SourcePrefixesError: metadata.annotations[...]: '10.0.0.1/8' is not a network (host bits set)
    """
    if not isinstance(annotations, dict) or ALLOWED_SOURCE_PREFIXES not in annotations:
        return ()
    where = f"metadata.annotations[{ALLOWED_SOURCE_PREFIXES}]"
    raw = annotations[ALLOWED_SOURCE_PREFIXES]
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SourcePrefixesError(f'{where}: must be a JSON list of CIDRs, such as ["10.0.0.0/8"]')
    if len(value) > MAX_SOURCE_PREFIXES:
        raise SourcePrefixesError(f"{where}: at most {MAX_SOURCE_PREFIXES} prefixes")
    out = []
    for text in value:
        try:
            out.append(str(ipaddress.ip_network(text, strict=True)))
        except ValueError:
            why = "host bits set" if _is_network_with_host_bits(text) else "not a CIDR"
            raise SourcePrefixesError(f"{where}: {text!r} is not a network ({why})") from None
    return tuple(sorted(set(out)))


def _is_network_with_host_bits(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


# The IPAM handle of a node's VXLAN tunnel address: `tulle-tunnel/<node>/v<family>`. Held by the
# node itself, never by an endpoint, and never garbage-collected.
TUNNEL_HANDLE_PREFIX = "tulle-tunnel/"


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
    problems: tuple[str, ...] = ()  # what the agent could not honour for it (status.problems)

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
        obj: Obj = {
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
        if self.problems:
            obj["status"] = {"problems": list(self.problems)}
        return obj

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
            problems=tuple(str(p) for p in (obj.get("status") or {}).get("problems") or ()),
        )
