"""How a Pod reads when the node it runs on is gone.

A pod's status is what its node reported; once the node is removed (its Node object deleted),
nobody vouches for it any more. Kubernetes' node lifecycle controller then marks the pod not
ready with the reason NodeLost, and kubectl shows it as Unknown until the pod garbage collector
deletes it. Tulle's agents delete such pods after `--node-grace` (agent/removed_nodes.py); until
then a reader sees them this way, derived when read, as a Node's Ready condition is derived
from its agent's heartbeat (agent/node.py).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable
from typing import Any

NODE_LOST = "NodeLost"
FINISHED_PHASES = ("Succeeded", "Failed")  # what a finished pod reported stays true


def on_lost_node(pod: dict[str, Any]) -> dict[str, Any]:
    """The Pod as a reader should see it once its node is gone: phase Unknown, not ready.

    >>> pod = {"metadata": {"name": "web"}, "spec": {"nodeName": "node4"},
    ...        "status": {"phase": "Running", "containerStatuses": [{"name": "main", "ready": True}]}}
    >>> lost = on_lost_node(pod)
    >>> lost["status"]["phase"], lost["status"]["reason"], lost["status"]["containerStatuses"][0]["ready"]
    ('Unknown', 'NodeLost', False)
    >>> pod["status"]["phase"]  # the object read is left as it was
    'Running'
    """
    out = copy.deepcopy(pod)
    status = out.setdefault("status", {})
    node = (out.get("spec") or {}).get("nodeName")
    status["phase"] = "Unknown"
    status["reason"] = NODE_LOST
    status["message"] = f"Node {node} which was running pod {out['metadata'].get('name')} no longer exists"
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"] + [
        {"type": "Ready", "status": "False", "reason": NODE_LOST}
    ]
    status["containerStatuses"] = [dict(c, ready=False) for c in status.get("containerStatuses") or []]
    return out


def with_node_presence(pods: Iterable[dict[str, Any]], nodes: Collection[str]) -> list[dict[str, Any]]:
    """The pods, those on a node that is not among `nodes` (and not finished) as `on_lost_node`.

    >>> pods = [{"metadata": {"name": n}, "spec": {"nodeName": node}, "status": {"phase": "Running"}}
    ...         for n, node in (("a", "node1"), ("b", "node4"), ("c", ""))]
    >>> [p["status"]["phase"] for p in with_node_presence(pods, {"node1"})]
    ['Running', 'Unknown', 'Running']
    """
    out = []
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        lost = bool(node) and node not in nodes and phase not in FINISHED_PHASES
        out.append(on_lost_node(pod) if lost else pod)
    return out
