"""What a node's agent tells readers through its Node object, beside what routing reads: the
underlay interface it uses, why it is not ready, and the last CNI failure of each of its pods.

The kubelet does the same in Kubernetes: a Node's conditions carry the reasons it is not ready,
and a failed sandbox set-up (a CNI error) is an event on the Pod. Tulle has no events, so the
agent keeps the newest failure per pod, for at most MAX_CNI_FAILURES pods, in an annotation of
its own Node: readable by anyone who may read Nodes (`tulle describe`), written only by that
node's agent (it may write its own Node and nothing else of the kind), and bounded in size.
All of it is plain data here; the agent's node controller writes it (`agent/node_controller.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tulle.model.kinds import Obj

ANNOTATION_UNDERLAY = "tulle.dev/underlay-interface"
ANNOTATION_PROBLEMS = "tulle.dev/agent-problems"  # JSON list of strings; [] when ready
ANNOTATION_CNI_FAILURES = "tulle.dev/cni-failures"  # JSON list of CniFailure, newest first

MAX_CNI_FAILURES = 32
MAX_MESSAGE = 400  # characters of one message kept: the annotation stays small


@dataclass(frozen=True)
class CniFailure:
    """One CNI command the agent answered with an error, for one pod."""

    pod: str  # namespace/name, from K8S_POD_NAMESPACE and K8S_POD_NAME
    command: str  # ADD, DEL or CHECK
    code: int  # the CNI error code (spec: 11 try again later, ...)
    message: str  # msg and details, as the runtime was told them
    at: float  # when, seconds since the epoch

    def text(self) -> str:
        """`2026-12-01 10:02:03 ADD failed with CNI error 11: the datastore is not reachable`."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))
        return f"{when} {self.command} failed with CNI error {self.code}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"pod": self.pod, "command": self.command, "code": self.code, "message": self.message, "at": self.at}

    @classmethod
    def from_json(cls, data: Any) -> CniFailure | None:
        """None for an entry that is not one (written by something else, or damaged)."""
        if not isinstance(data, dict):
            return None
        pod, command, code, message, at = (data.get(k) for k in ("pod", "command", "code", "message", "at"))
        if not (isinstance(pod, str) and isinstance(command, str) and isinstance(message, str)):
            return None
        if isinstance(code, bool) or not isinstance(code, int) or not isinstance(at, int | float):
            return None
        return cls(pod, command, code, message, float(at))


def cni_failure(pod: str, command: str, error: Any, at: float) -> CniFailure:
    """A failure from the error object a CNI command answered with (`{"code", "msg", "details"}`).

    >>> cni_failure("web/a", "ADD", {"code": 11, "msg": "try later", "details": "etcd away"}, 0).message
    'try later: etcd away'
    """
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    parts = [str(error.get(k)) for k in ("msg", "details") if error.get(k)]
    message = ": ".join(parts) or "no message"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return CniFailure(pod, command, code if isinstance(code, int) and not isinstance(code, bool) else 0, message, at)


def with_failure(failures: Sequence[CniFailure], new: CniFailure) -> tuple[CniFailure, ...]:
    """The newest failure of each pod, newest first, at most MAX_CNI_FAILURES pods.

    >>> a1, b = CniFailure("x/a", "ADD", 11, "1", 1), CniFailure("x/b", "ADD", 7, "2", 2)
    >>> [f.message for f in with_failure(with_failure([a1], b), CniFailure("x/a", "DEL", 11, "3", 3))]
    ['3', '2']
    """
    return (new, *(f for f in failures if f.pod != new.pod))[:MAX_CNI_FAILURES]


def report_annotations(underlay: str, problems: Iterable[str], failures: Sequence[CniFailure]) -> dict[str, str]:
    """The annotations the agent keeps on its Node (compact JSON: a change of nothing writes nothing)."""
    return {
        ANNOTATION_UNDERLAY: underlay,
        ANNOTATION_PROBLEMS: json.dumps(list(problems), separators=(",", ":")),
        ANNOTATION_CNI_FAILURES: json.dumps([f.to_json() for f in failures], separators=(",", ":")),
    }


def _annotation(node: Obj, key: str) -> Any:
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return annotations.get(key) if isinstance(annotations, dict) else None


def _json_annotation(node: Obj, key: str) -> Any:
    raw = _annotation(node, key)
    try:
        return json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def underlay_of(node: Obj) -> str:
    """The underlay interface its agent published ('' if none did)."""
    value = _annotation(node, ANNOTATION_UNDERLAY)
    return value if isinstance(value, str) else ""


def problems_of(node: Obj) -> list[str] | None:
    """Why its agent said it is not ready ([] if it is); None if the agent published nothing."""
    value = _json_annotation(node, ANNOTATION_PROBLEMS)
    if not isinstance(value, list):
        return None
    return [str(p) for p in value]


def cni_failures_of(node: Obj) -> list[CniFailure]:
    """The CNI failures its agent published, newest first."""
    value = _json_annotation(node, ANNOTATION_CNI_FAILURES)
    found = [CniFailure.from_json(v) for v in value] if isinstance(value, list) else []
    return [f for f in found if f is not None]


def last_cni_failure(nodes: Iterable[Obj], pod: str) -> tuple[str, CniFailure] | None:
    """(node, failure): the newest CNI failure any node's agent published for the pod."""
    found = []
    for node in nodes:
        name = str((node.get("metadata") or {}).get("name", ""))
        found += [(failure.at, name, failure) for failure in cni_failures_of(node) if failure.pod == pod]
    if not found:
        return None
    _, name, failure = max(found, key=lambda t: t[0])
    return name, failure
