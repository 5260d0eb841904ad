"""`tulle describe KIND NAME`: one object and the objects related to it, as `kubectl describe`.

    tulle describe pod web -n shop --lab demo      # its endpoint, addresses, node, policies, CNI error
    tulle describe no node1 --lab demo             # its blocks, pods, and its agent's problems
    tulle describe netpol/allow-web -n shop --lab demo
    tulle describe ns shop --lab demo              # its pods and policies

Which policies select a pod, and what a policy's rules mean, come from the same compiled policy
model the agents build their datapath from, in the words `tulle policy trace` uses. What only a
node's agent knows (why it is not ready, a pod's last CNI failure) is what it published on its
Node (`model/node_report.py`), so describe needs nothing but the datastore.

The functions that say what to show are pure (a `Snapshot` of plain objects in, lines out);
`cmd_describe` only reads the snapshot and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from tulle.agent.node import ANNOTATION_AGENT_VERSION, is_ready, with_ready_condition
from tulle.cli.common import add_datastore_args, open_datastore
from tulle.cli.related import (
    endpoint_pod,
    key_of,
    name_of,
    node_addresses,
    node_shares,
    pod_addresses,
    routing_mode,
    sorted_cidrs,
)
from tulle.cli.resources_cmd import _add_parser, _age, _kind_and_names, _namespace_args, _not_found, selector_text
from tulle.datastore.base import Datastore
from tulle.model.kinds import IPAM_BLOCK, NAMESPACE, NETWORK_POLICY, NODE, POD, WORKLOAD_ENDPOINT, Kind, Obj
from tulle.model.node_report import cni_failures_of, last_cni_failure, problems_of, underlay_of
from tulle.model.pod_status import with_node_presence
from tulle.policy.compiler import EGRESS, INGRESS, CompiledPolicy, PolicyModel, compile_policies
from tulle.policy.inputs import inputs_from_objects
from tulle.policy.trace import rule_body_words


def register(sub: Any) -> None:
    p = _add_parser(
        sub,
        "describe",
        help="show an object with the objects related to it",
        description=(
            "Show an object and what relates to it: a pod's endpoints, addresses, node, the policies "
            "that select it and its last CNI error; a node's blocks, pods and its agent's problems; a "
            "network policy's pods and its rules in words; a namespace's pods and policies. KIND is "
            "kubectl's name for it (po, no, netpol, ns, ...), NAME or KIND/NAME."
        ),
    )
    p.add_argument("kind", metavar="KIND", help="pod|po, node|no, networkpolicy|netpol, namespace|ns, ... or KIND/NAME")
    p.add_argument("names", nargs="*", metavar="NAME", help="the objects to describe (default: all of the kind)")
    _namespace_args(p)
    add_datastore_args(p)
    p.set_defaults(func=cmd_describe)


# --- what is read ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything describe relates, read once: Nodes with their Ready condition, Pods as a
    reader sees them (those of a removed node lost)."""

    namespaces: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    policies: list[Obj] = field(default_factory=list)
    endpoints: list[Obj] = field(default_factory=list)
    nodes: list[Obj] = field(default_factory=list)
    blocks: list[Obj] = field(default_factory=list)
    now: float = 0.0

    @cached_property
    def model(self) -> PolicyModel:
        return compile_policies(inputs_from_objects(self.namespaces, self.pods, self.policies, self.endpoints))

    def node(self, name: str) -> Obj | None:
        return next((n for n in self.nodes if name_of(n) == name), None)


def read_snapshot(store: Datastore) -> Snapshot:
    namespaces, pods, policies, endpoints, nodes, blocks = (
        store.list(kind)[0] for kind in (NAMESPACE, POD, NETWORK_POLICY, WORKLOAD_ENDPOINT, NODE, IPAM_BLOCK)
    )
    alive = store.live_nodes()
    nodes = [with_ready_condition(n, name_of(n) in alive) for n in nodes]
    pods = with_node_presence(pods, {name_of(n) for n in nodes})
    return Snapshot(namespaces, pods, policies, endpoints, nodes, blocks, time.time())


# --- how it is shown ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A heading with fields or lines under it, indented; `empty` is said when it has neither."""

    fields: tuple[Field, ...] = ()
    lines: tuple[str, ...] = ()
    empty: str = "<none>"


# A value: one line; several lines aligned under the first (labels, addresses); or a section.
Value = str | list[str] | Section
Field = tuple[str, Value]


def render(fields: Sequence[Field], indent: int = 0) -> list[str]:
    """Fields as `kubectl describe` prints them: `Label:  value`, values aligned in each block.

    >>> print("\\n".join(render([("Name", "web"), ("IPs", ["10.0.0.1", "fd00::1"]),
    ...                          ("Policies", Section((("Ingress", "x/deny"),)))])))
    Name:      web
    IPs:       10.0.0.1
               fd00::1
    Policies:
      Ingress:  x/deny
    """
    pad = " " * indent
    width = max((len(label) + 1 for label, _ in fields), default=0) + 2
    out: list[str] = []
    for label, value in fields:
        head = f"{pad}{label}:"
        if isinstance(value, Section):
            if not value.fields and not value.lines:
                out.append(f"{head:<{indent + width}}{value.empty}".rstrip())
                continue
            out.append(head)
            out += render(value.fields, indent + 2)
            out += [f"{pad}  {line}" for line in value.lines]
        elif isinstance(value, list):
            values = value or ["<none>"]
            out.append(f"{head:<{indent + width}}{values[0]}".rstrip())
            out += [f"{' ' * (indent + width)}{v}".rstrip() for v in values[1:]]
        else:
            out.append(f"{head:<{indent + width}}{value}".rstrip())
    return out


def aligned(rows: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Rows as lines with their columns aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max((len(r) for r in rows), default=0))]
    return tuple("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _labels(obj: Obj) -> list[str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return [f"{k}={v}" for k, v in sorted(labels.items())]


def _spec(obj: Obj) -> dict[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _status(obj: Obj) -> dict[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, dict) else {}


def _node_state(snapshot: Snapshot, name: str) -> str:
    node = snapshot.node(name)
    if node is None:
        return f"{name} (removed: no such Node)"
    return f"{name} ({'Ready' if is_ready(node) else 'NotReady'})"


def _policies_of(model: PolicyModel, pod_key: str, direction: str) -> Value:
    pod = model.pods.get(pod_key)
    keys = pod.isolating(direction) if pod is not None else ()
    if not keys:
        word = "Ingress" if direction == INGRESS else "Egress"
        return f"<none>: not isolated, all {direction} allowed (no policy selecting it has {word})"
    return list(keys)


# --- pods --------------------------------------------------------------------------------------


def describe_pod(snapshot: Snapshot, pod: Obj) -> list[str]:
    key = key_of(pod)
    spec, status = _spec(pod), _status(pod)
    node = spec.get("nodeName")
    phase = str(status.get("phase") or "Pending")
    reason, message = status.get("reason"), status.get("message")
    if reason:
        phase += f" ({reason}: {message})" if message else f" ({reason})"
    endpoints = [e for e in snapshot.endpoints if endpoint_pod(e) == key]
    failure = last_cni_failure(snapshot.nodes, key)
    fields: list[Field] = [
        ("Name", name_of(pod)),
        ("Namespace", key.split("/")[0]),
        ("Node", _node_state(snapshot, node) if isinstance(node, str) and node else "<none> (not scheduled)"),
        ("Labels", _labels(pod)),
        ("Status", phase),
        ("IPs", pod_addresses(pod, snapshot.endpoints)),
        ("Containers", Section(tuple(_container(c) for c in spec.get("containers") or [] if isinstance(c, dict)))),
        (
            "Endpoints",
            Section(tuple(_endpoint(e) for e in endpoints), empty="<none> (no CNI ADD has given it a network)"),
        ),
        (
            "Policies",
            Section(
                (
                    ("Ingress", _policies_of(snapshot.model, key, INGRESS)),
                    ("Egress", _policies_of(snapshot.model, key, EGRESS)),
                )
            ),
        ),
        ("Last CNI error", f"{failure[1].text()} (on {failure[0]})" if failure else "<none>"),
        ("Age", _age(pod, snapshot.now)),
    ]
    return render(fields)


def _container(container: dict[str, Any]) -> Field:
    ports = []
    for port in container.get("ports") or []:
        if isinstance(port, dict):
            named = f" ({port['name']})" if port.get("name") else ""
            ports.append(f"{port.get('containerPort')}/{port.get('protocol', 'TCP')}{named}")
    return (
        str(container.get("name", "")),
        Section((("Image", str(container.get("image", ""))), ("Ports", ports))),
    )


def _endpoint(endpoint: Obj) -> Field:
    spec = _spec(endpoint)
    problems = [str(p) for p in _status(endpoint).get("problems") or []]
    fields: tuple[Field, ...] = (
        ("Node", str(spec.get("node", ""))),
        ("Interface", f"{spec.get('hostInterface') or '<unknown>'} on the node, {spec.get('ifname', '')} in the pod"),
        ("MAC", str(spec.get("mac") or "<unknown>")),
        ("IPs", [str(ip) for ip in spec.get("ips") or []]),
        ("Problems", problems),
    )
    return name_of(endpoint), Section(fields)


# --- nodes -------------------------------------------------------------------------------------


def describe_node(snapshot: Snapshot, node: Obj) -> list[str]:
    name = name_of(node)
    share = node_shares([node], snapshot.pods, snapshot.endpoints, snapshot.blocks)[name]
    ready = is_ready(node)
    conditions = [c for c in _status(node).get("conditions") or [] if c.get("type") == "Ready"]
    problems = problems_of(node)
    if problems is None:
        problems_value: Value = "<unknown>: its agent has published none"
    else:
        problems_value = problems or ["<none>"]
        if not ready:
            problems_value = [*problems_value, "(as its agent last published them: it is not responding now)"]
    pods = {key_of(p): p for p in snapshot.pods}
    pod_rows = []
    for key in sorted(share.pods):
        pod = pods.get(key)
        addresses = pod_addresses(pod, snapshot.endpoints) if pod is not None else _endpoint_addresses(snapshot, key)
        pod_rows.append([key, ", ".join(addresses) or "<no address>", "" if pod is not None else "(no Pod object)"])
    block_rows = [
        [cidr, f"{share.blocks[cidr][0]} of {share.blocks[cidr][1]} addresses in use"]
        for cidr in sorted_cidrs(share.blocks)
    ]
    failures = [[f.pod, f.text()] for f in cni_failures_of(node)]
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    fields: list[Field] = [
        ("Name", name),
        ("Labels", _labels(node)),
        (
            "Status",
            f"{'Ready' if ready else 'NotReady'} ({conditions[0].get('message', '')})" if conditions else "NotReady",
        ),
        ("Routing mode", routing_mode(node)),
        ("Addresses", node_addresses(node)),
        ("Underlay", underlay_of(node) or "<unknown>"),
        ("Agent version", str(annotations.get(ANNOTATION_AGENT_VERSION) or "<unknown>")),
        ("Problems", problems_value),
        ("Blocks", Section(lines=aligned(block_rows))),
        ("Pods", Section(lines=aligned(pod_rows))),
        ("CNI failures", Section(lines=aligned(failures))),
        ("Age", _age(node, snapshot.now)),
    ]
    return render(fields)


def _endpoint_addresses(snapshot: Snapshot, pod_key: str) -> list[str]:
    return sorted(
        {str(ip) for e in snapshot.endpoints if endpoint_pod(e) == pod_key for ip in _spec(e).get("ips") or []}
    )


# --- network policies --------------------------------------------------------------------------


def describe_network_policy(snapshot: Snapshot, policy: Obj) -> list[str]:
    key = key_of(policy)
    spec = _spec(policy)
    types = [str(t) for t in spec.get("policyTypes") or []]
    compiled = snapshot.model.policies.get(key)
    fields: list[Field] = [
        ("Name", name_of(policy)),
        ("Namespace", key.split("/")[0]),
        ("Labels", _labels(policy)),
        ("Pod selector", f"{selector_text(spec.get('podSelector'))} (in namespace {key.split('/')[0]})"),
        ("Policy types", ", ".join(types) or "<none>"),
    ]
    if compiled is None:
        why = [w for w in snapshot.model.warnings if key in w] or ["it could not be read"]
        fields.append(("Ignored", why))  # the compiler skipped it: it isolates nothing
        fields.append(("Age", _age(policy, snapshot.now)))
        return render(fields)
    selected = sorted(k for k, p in snapshot.model.pods.items() if key in p.ingress or key in p.egress)
    fields += [
        ("Selected pods", selected),
        ("Ingress rules", _rules_section(compiled, INGRESS)),
        ("Egress rules", _rules_section(compiled, EGRESS)),
        ("Age", _age(policy, snapshot.now)),
    ]
    return render(fields)


def _rules_section(policy: CompiledPolicy, direction: str) -> Section:
    rules = policy.ingress if direction == INGRESS else policy.egress
    word = "Ingress" if direction == INGRESS else "Egress"
    if rules is None:
        return Section(empty=f"<none>: {word} is not in its policyTypes, it does not isolate {direction}")
    lines = tuple(f"rule {rule.index + 1}: {rule_body_words(rule)}" for rule in rules)
    return Section(lines=lines, empty=f"<none>: the selected pods are allowed no {direction}")


# --- namespaces and the rest -------------------------------------------------------------------


def describe_namespace(snapshot: Snapshot, namespace: Obj) -> list[str]:
    name = name_of(namespace)
    pods = sorted((p for p in snapshot.pods if key_of(p).split("/")[0] == name), key=name_of)
    pod_rows = [
        [
            name_of(p),
            str(_spec(p).get("nodeName") or "<no node>"),
            str(_status(p).get("phase") or "Pending"),
            ", ".join(pod_addresses(p, snapshot.endpoints)) or "<no address>",
        ]
        for p in pods
    ]
    policies = sorted((p for p in snapshot.policies if key_of(p).split("/")[0] == name), key=name_of)
    policy_rows = [
        [
            name_of(p),
            f"pod selector {selector_text(_spec(p).get('podSelector'))}",
            ", ".join(str(t) for t in _spec(p).get("policyTypes") or []),
        ]
        for p in policies
    ]
    fields: list[Field] = [
        ("Name", name),
        ("Labels", _labels(namespace)),
        ("Status", str(_status(namespace).get("phase") or "Active")),
        ("Pods", Section(lines=aligned(pod_rows))),
        ("Network policies", Section(lines=aligned(policy_rows))),
        ("Age", _age(namespace, snapshot.now)),
    ]
    return render(fields)


def describe_other(snapshot: Snapshot, kind: Kind, obj: Obj) -> list[str]:
    """Kinds without a view of their own: their labels, spec and status as YAML."""
    fields: list[Field] = [("Name", name_of(obj))]
    if kind.namespaced:
        fields.append(("Namespace", key_of(obj).split("/")[0]))
    fields += [("Kind", kind.kind), ("Labels", _labels(obj)), ("Age", _age(obj, snapshot.now))]
    for part in ("spec", "status"):
        if obj.get(part):
            text = yaml.safe_dump(obj[part], sort_keys=False, default_flow_style=False).rstrip()
            fields.append((part.capitalize(), Section(lines=tuple(text.splitlines()))))
    return render(fields)


def describe(snapshot: Snapshot, kind: Kind, obj: Obj) -> list[str]:
    if kind is POD:
        return describe_pod(snapshot, obj)
    if kind is NODE:
        return describe_node(snapshot, obj)
    if kind is NETWORK_POLICY:
        return describe_network_policy(snapshot, obj)
    if kind is NAMESPACE:
        return describe_namespace(snapshot, obj)
    return describe_other(snapshot, kind, obj)


# --- the command -------------------------------------------------------------------------------


def cmd_describe(args: argparse.Namespace) -> int:
    kind, names = _kind_and_names(args.kind, args.names)
    namespace = (args.namespace or "default") if kind.namespaced else None
    store = open_datastore(args)
    try:
        if names:
            found = [(name, store.get(kind, name, namespace)) for name in names]
        else:
            found = [(name_of(o), o) for o in sorted(store.list(kind, namespace)[0], key=name_of)]
        snapshot = read_snapshot(store) if any(obj is not None for _, obj in found) else Snapshot()
    finally:
        store.close()
    status = 0
    shown = 0
    for name, obj in found:
        if obj is None:
            _not_found(kind, name)
            status = 1
            continue
        # what describe shows of a Pod or a Node is as a reader sees it (lost, Ready or not)
        current = _as_read(snapshot, kind, obj)
        if shown:
            print()
        print("\n".join(describe(snapshot, kind, current)))
        shown += 1
    if not found:
        where = f" in {namespace} namespace" if namespace else ""
        print(f"No resources found{where}.", file=sys.stderr)
    return status


def _as_read(snapshot: Snapshot, kind: Kind, obj: Obj) -> Obj:
    if kind is POD:
        return next((p for p in snapshot.pods if key_of(p) == key_of(obj)), obj)
    if kind is NODE:
        return snapshot.node(name_of(obj)) or obj
    return obj
