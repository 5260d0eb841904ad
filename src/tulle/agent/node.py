"""The node's registration in the datastore: a Kubernetes-shaped Node object.

Flannel-style: what other nodes need to route to us travels in annotations of our Node
(routing mode, VXLAN MAC and tunnel address per family); our underlay addresses are the
Node's InternalIP addresses. The object belongs to the node, not to its agent's heartbeat:
it stays while the agent is down or cut off, so every other node keeps routing to the pods
that still run here, and goes only when the node is removed (docs/design/datastore.md).
"""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

from tulle.model.kinds import NODE
from tulle.routing.compile import NodeInfo, VxlanEndpoint

ANNOTATION_MODE = "tulle.dev/routing-mode"
ANNOTATION_VXLAN = "tulle.dev/vxlan-v{family}"
# The version of the agent that registered the node last (`tulle version`), as a kubelet
# publishes its own in its Node's status.nodeInfo.
ANNOTATION_AGENT_VERSION = "tulle.dev/agent-version"


def installed_version() -> str:
    """This installation's version, from the package's metadata (what pip installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tulle")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import tulle

        return tulle.__version__


def node_object(
    name: str, mode: str, addresses: list[str], vxlan: list[VxlanEndpoint], agent_version: str = ""
) -> dict[str, Any]:
    annotations = {ANNOTATION_MODE: mode}
    if agent_version:
        annotations[ANNOTATION_AGENT_VERSION] = agent_version
    for v in vxlan:
        annotations[ANNOTATION_VXLAN.format(family=v.family)] = json.dumps(
            {"mac": v.mac, "tunnelAddress": v.tunnel_address}, sort_keys=True
        )
    return {
        "apiVersion": NODE.api_version,
        "kind": NODE.kind,
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "annotations": annotations},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


def merge_registration(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """`current` with what this agent registers (its annotations, the hostname label, addresses)
    taken from `wanted`, keeping what others set (labels, other annotations, metadata)."""
    merged = copy.deepcopy(current)
    meta = merged.setdefault("metadata", {})
    annotations = meta.setdefault("annotations", {})
    for family in (4, 6):
        annotations.pop(ANNOTATION_VXLAN.format(family=family), None)  # a family we lost goes
    annotations.update(wanted["metadata"]["annotations"])
    meta.setdefault("labels", {}).update(wanted["metadata"]["labels"])
    merged.setdefault("status", {})["addresses"] = wanted["status"]["addresses"]
    return merged


def with_ready_condition(obj: dict[str, Any], alive: bool) -> dict[str, Any]:
    """The Node as a reader should see it: a Ready condition from its agent's heartbeat, as
    the kubelet's node lease decides Ready in Kubernetes. Liveness is only reported: routing
    never reads it."""
    out = copy.deepcopy(obj)
    condition = (
        {"type": "Ready", "status": "True", "reason": "AgentAlive", "message": "the tulle agent is running"}
        if alive
        else {
            "type": "Ready",
            "status": "Unknown",
            "reason": "AgentNotResponding",
            "message": "the tulle agent's heartbeat expired; the node keeps its routes and addresses",
        }
    )
    status = out.setdefault("status", {})
    status["conditions"] = [c for c in status.get("conditions", []) if c.get("type") != "Ready"] + [condition]
    return out


def is_ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def node_info(obj: dict[str, Any]) -> NodeInfo | None:
    """A Node object as routing input; None if it lacks what routing needs."""
    try:
        name = obj["metadata"]["name"]
        addresses = []
        for entry in obj.get("status", {}).get("addresses", []):
            if entry.get("type") == "InternalIP":
                addresses.append(str(ipaddress.ip_address(entry["address"])))
        annotations = obj["metadata"].get("annotations", {})
        vxlan = []
        for family in (4, 6):
            raw = annotations.get(ANNOTATION_VXLAN.format(family=family))
            if raw:
                data = json.loads(raw)
                vxlan.append(VxlanEndpoint(family=family, mac=data["mac"], tunnel_address=data["tunnelAddress"]))
        return NodeInfo(name=name, addresses=tuple(addresses), vxlan=tuple(vxlan))
    except (KeyError, ValueError, TypeError):
        return None
