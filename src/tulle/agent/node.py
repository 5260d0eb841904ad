"""The node's registration in the datastore: a Kubernetes-shaped Node object under a lease.

Flannel-style: what other nodes need to route to us travels in annotations of our Node
(routing mode, VXLAN MAC and tunnel address per family); our underlay addresses are the
Node's InternalIP addresses. The object is put with a lease that the agent keeps alive, so
a node that dies disappears from the datastore when the lease runs out.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from tulle.model.kinds import NODE
from tulle.routing.compile import NodeInfo, VxlanEndpoint

ANNOTATION_MODE = "tulle.dev/routing-mode"
ANNOTATION_VXLAN = "tulle.dev/vxlan-v{family}"


def node_object(name: str, mode: str, addresses: list[str], vxlan: list[VxlanEndpoint]) -> dict[str, Any]:
    annotations = {ANNOTATION_MODE: mode}
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
