"""What the policy compiler reads: namespaces, pods and NetworkPolicies as typed, frozen values.

`inputs_from_objects` turns the datastore's plain dicts (Kubernetes JSON) into these values.
Objects were validated on the way into the datastore, but a malformed one never stops the
compiler: it is skipped and reported in `PolicyInputs.warnings`. Where a policy is only partly
malformed, the choice fails closed:
- a malformed podSelector or policyTypes skips the whole policy (who it isolates is unknown);
- a malformed rule (a bad peer, port or ipBlock) skips that rule only: the policy still
  isolates, and the rule allows nothing (dropping just the bad peer could leave an empty peer
  list, which would mean "everyone").

A pod's addresses are the union of its WorkloadEndpoints' `spec.ips` and its `status.podIPs`
(except for host-network pods, whose addresses are the node's, and pods that have finished,
whose addresses may already belong to someone else). An endpoint without a Pod object is a pod
with no labels and no named ports. A namespace without a Namespace object still exists for
policy, with the one label the API server always sets, `kubernetes.io/metadata.name`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tulle.model.endpoints import SourcePrefixesError, allowed_source_prefixes
from tulle.model.protocols import KUBERNETES_PROTOCOLS, TCP
from tulle.model.selectors import EVERYTHING, LabelSelector, SelectorError, parse_selector

Labels = tuple[tuple[str, str], ...]  # sorted (key, value) pairs: hashable, comparable

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
TYPE_INGRESS = "Ingress"
TYPE_EGRESS = "Egress"


class Malformed(ValueError):
    """An object, or a part of one, that the compiler cannot use."""


@dataclass(frozen=True)
class NamedPort:
    """A container port with a name: the target of a NetworkPolicy port given by name."""

    name: str
    protocol: int  # 6, 17 or 132
    port: int


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Labels = ()
    addresses: tuple[str, ...] = ()  # canonical text form, IPv4 and IPv6
    named_ports: tuple[NamedPort, ...] = ()
    node: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodPeer:
    """Pods selected by a peer: in one namespace (no namespaceSelector) or in selected ones."""

    namespace: str | None  # the policy's own namespace when there is no namespaceSelector
    namespace_selector: LabelSelector | None
    pod_selector: LabelSelector = EVERYTHING

    def text(self) -> str:
        """`pods app=a in namespace x`, `all pods in namespaces team=blue`, `all pods in all namespaces`."""
        pods = "all pods" if self.pod_selector.empty else f"pods {self.pod_selector.text()}"
        if self.namespace_selector is None:
            return f"{pods} in namespace {self.namespace}"
        if self.namespace_selector.empty:
            return f"{pods} in all namespaces"
        return f"{pods} in namespaces {self.namespace_selector.text()}"


@dataclass(frozen=True)
class CidrPeer:
    """Addresses in cidr but in none of excepts; says nothing about the other family."""

    cidr: str  # canonical network, e.g. 10.0.0.0/8
    excepts: tuple[str, ...] = ()

    @property
    def family(self) -> int:
        return ipaddress.ip_network(self.cidr).version

    def text(self) -> str:
        return self.cidr + (f" except {', '.join(self.excepts)}" if self.excepts else "")


Peer = PodPeer | CidrPeer


@dataclass(frozen=True)
class PortEntry:
    """One NetworkPolicyPort: a number or range, a name, or (neither) every port of protocol."""

    protocol: int = 6  # TCP when not given (NetworkPolicyPort.protocol defaults to TCP)
    port: int | None = None
    end_port: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class Rule:
    index: int  # position in the policy's ingress or egress list, as the user wrote it
    peers: tuple[Peer, ...] = ()  # empty: every peer (from/to missing or empty)
    ports: tuple[PortEntry, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    pod_selector: LabelSelector = EVERYTHING
    types: tuple[str, ...] = (TYPE_INGRESS,)  # after defaulting; a subset of (Ingress, Egress)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PolicyInputs:
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    policies: tuple[Policy, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)


# -- parsing -------------------------------------------------------------------------------------


def _labels(meta: Mapping[str, Any], where: str) -> Labels:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Malformed(f"{where}: metadata.labels must map strings to strings")
    return tuple(sorted(labels.items()))


def _meta(obj: Any, kind: str, namespaced: bool) -> tuple[str, str, Mapping[str, Any]]:
    if not isinstance(obj, dict):
        raise Malformed(f"a {kind} that is not an object: {str(obj)[:80]!r}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise Malformed(f"a {kind} without metadata.name")
    namespace = meta.get("namespace", "default") if namespaced else ""
    if not isinstance(namespace, str) or (namespaced and not namespace):
        raise Malformed(f"{kind} {meta['name']}: metadata.namespace must be a string")
    return namespace, meta["name"], meta


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{where}: {value!r} is not an IP address")
    try:
        return str(ipaddress.ip_interface(value).ip)  # tolerate "10.1.2.3/32"
    except ValueError:
        raise Malformed(f"{where}: {value!r} is not an IP address") from None


def parse_namespace(obj: Any) -> Namespace:
    _, name, meta = _meta(obj, "Namespace", namespaced=False)
    labels = dict(_labels(meta, f"Namespace {name}"))
    labels[NAMESPACE_NAME_LABEL] = name  # the API server sets it, always equal to the name
    return Namespace(name, tuple(sorted(labels.items())))


def _protocol(value: Any, where: str) -> int:
    if value is None:
        return TCP
    if not isinstance(value, str) or value.upper() not in KUBERNETES_PROTOCOLS:
        raise Malformed(f"{where}: protocol {value!r} is not TCP, UDP or SCTP")
    return KUBERNETES_PROTOCOLS[value.upper()]


def _named_ports(spec: Mapping[str, Any], where: str, warnings: list[str]) -> tuple[NamedPort, ...]:
    """The pod's named container ports; a malformed one is skipped (the pod keeps its labels)."""
    out: set[NamedPort] = set()
    containers = spec.get("containers") or []
    if not isinstance(containers, list):
        warnings.append(f"{where}: spec.containers must be a list; the pod has no named ports")
        return ()
    for c, container in enumerate(containers):
        ports = (container.get("ports") or []) if isinstance(container, dict) else None
        if not isinstance(ports, list):
            warnings.append(f"{where}: spec.containers[{c}].ports must be a list; skipped")
            continue
        for p, port in enumerate(ports):
            at = f"{where}: spec.containers[{c}].ports[{p}]"
            if not isinstance(port, dict) or not port.get("name"):
                continue
            name, number = port["name"], port.get("containerPort")
            try:
                if not isinstance(name, str) or not isinstance(number, int) or not 0 < number < 65536:
                    raise Malformed(f"{at}: needs a string name and a containerPort from 1 to 65535")
                out.add(NamedPort(name, _protocol(port.get("protocol"), at), number))
            except Malformed as exc:
                warnings.append(f"{exc}; this port is skipped")
    return tuple(sorted(out, key=lambda n: (n.name, n.protocol, n.port)))


def _addresses(values: Iterable[Any], where: str, warnings: list[str]) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(_address(value, where))
        except Malformed as exc:
            warnings.append(f"{exc}; this address is skipped")
    return out


def _status_addresses(obj: Mapping[str, Any], where: str, warnings: list[str]) -> list[str]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(status, dict) or not isinstance(spec, dict):
        return []
    if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
        return []
    entries = status.get("podIPs") or []
    found = [e.get("ip") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    if not found and status.get("podIP"):
        found = [status["podIP"]]
    return _addresses(found, f"{where}: status.podIPs", warnings)


def parse_pod(obj: Any, warnings: list[str]) -> tuple[Pod, list[str]]:
    """The pod (without its endpoints' addresses) and the addresses from its status."""
    namespace, name, meta = _meta(obj, "Pod", namespaced=True)
    where = f"Pod {namespace}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise Malformed(f"{where}: spec must be an object")
    node = spec.get("nodeName")
    labels = _labels(meta, where)
    pod = Pod(
        namespace,
        name,
        labels,
        (),
        _named_ports(spec, where, warnings),
        node if isinstance(node, str) else "",
    )
    return pod, _status_addresses(obj, where, warnings)


def parse_endpoint(obj: Any, warnings: list[str]) -> tuple[str, str, str, list[str]]:
    """(namespace, pod, node, addresses) of a WorkloadEndpoint."""
    namespace, name, _ = _meta(obj, "WorkloadEndpoint", namespaced=True)
    where = f"WorkloadEndpoint {namespace}/{name}"
    spec = obj.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("pod"), str) or not spec["pod"]:
        raise Malformed(f"{where}: spec.pod must name the pod")
    ips = spec.get("ips") or []
    if not isinstance(ips, list):
        raise Malformed(f"{where}: spec.ips must be a list")
    node = spec.get("node")
    return (
        namespace,
        spec["pod"],
        node if isinstance(node, str) else "",
        _addresses(ips, f"{where}: spec.ips", warnings),
    )


def _selector(value: Any, where: str) -> LabelSelector:
    try:
        return parse_selector(value, where)
    except SelectorError as exc:
        raise Malformed(str(exc)) from None


def _peer(obj: Any, namespace: str, where: str) -> Peer:
    if not isinstance(obj, dict):
        raise Malformed(f"{where} must be an object")
    block = obj.get("ipBlock")
    pods, namespaces = obj.get("podSelector"), obj.get("namespaceSelector")
    if block is not None:
        if pods is not None or namespaces is not None:
            raise Malformed(f"{where}: ipBlock cannot be combined with podSelector or namespaceSelector")
        return _cidr_peer(block, f"{where}.ipBlock")
    if pods is None and namespaces is None:
        raise Malformed(f"{where}: a peer needs podSelector, namespaceSelector or ipBlock")
    pod_selector = _selector(pods, f"{where}.podSelector")
    if namespaces is None:
        return PodPeer(namespace, None, pod_selector)
    return PodPeer(None, _selector(namespaces, f"{where}.namespaceSelector"), pod_selector)


def _cidr_peer(obj: Any, where: str) -> CidrPeer:
    if not isinstance(obj, dict) or not isinstance(obj.get("cidr"), str):
        raise Malformed(f"{where}.cidr must be a CIDR string")
    try:
        net = ipaddress.ip_network(obj["cidr"], strict=False)
        excepts = [ipaddress.ip_network(e, strict=False) for e in obj.get("except") or []]
    except (ValueError, TypeError) as exc:
        raise Malformed(f"{where}: {exc}") from None
    for e in excepts:
        # NetworkPolicy validation: each except must be a strict subset of cidr.
        if e.version != net.version or not e.subnet_of(net) or e == net:  # type: ignore[arg-type]
            raise Malformed(f"{where}: except {e} is not inside {net}")
    return CidrPeer(str(net), tuple(sorted({str(e) for e in excepts})))


def _port(obj: Any, where: str) -> PortEntry:
    if not isinstance(obj, dict):
        raise Malformed(f"{where} must be an object")
    protocol = _protocol(obj.get("protocol"), where)
    port, end = obj.get("port"), obj.get("endPort")
    if port is None:
        if end is not None:
            raise Malformed(f"{where}: endPort needs a numeric port")
        return PortEntry(protocol)
    if isinstance(port, str):
        if end is not None:
            raise Malformed(f"{where}: endPort cannot go with the named port {port!r}")
        if not port or port.isdigit():
            raise Malformed(f"{where}: {port!r} is not a port name")
        return PortEntry(protocol, name=port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Malformed(f"{where}: port {port!r} is not from 1 to 65535")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or not port <= end < 65536):
        raise Malformed(f"{where}: endPort {end!r} must be from port ({port}) to 65535")
    return PortEntry(protocol, port, end)


def _rules(spec: Mapping[str, Any], section: str, namespace: str, where: str, warnings: list[str]) -> tuple[Rule, ...]:
    raw = spec.get(section) or []
    if not isinstance(raw, list):
        warnings.append(f"{where}: spec.{section} must be a list; the policy allows nothing in that direction")
        return ()
    peers_field = "from" if section == "ingress" else "to"
    out: list[Rule] = []
    for i, rule in enumerate(raw):
        at = f"spec.{section}[{i}]"
        try:
            if not isinstance(rule, dict):
                raise Malformed(f"{at} must be an object")
            peers_raw, ports_raw = rule.get(peers_field) or [], rule.get("ports") or []
            if not isinstance(peers_raw, list) or not isinstance(ports_raw, list):
                raise Malformed(f"{at}: {peers_field} and ports must be lists")
            peers = tuple(_peer(p, namespace, f"{at}.{peers_field}[{j}]") for j, p in enumerate(peers_raw))
            ports = tuple(_port(p, f"{at}.ports[{j}]") for j, p in enumerate(ports_raw))
        except Malformed as exc:
            warnings.append(f"{where}: {exc}; this rule is ignored (it allows nothing)")
            continue
        out.append(Rule(i, peers, ports))
    return tuple(out)


def parse_policy(obj: Any, warnings: list[str]) -> Policy:
    namespace, name, _ = _meta(obj, "NetworkPolicy", namespaced=True)
    where = f"NetworkPolicy {namespace}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise Malformed(f"{where}: spec must be an object")
    # PodSelector is a non-pointer field in NetworkPolicySpec: left out, it is {} (all pods).
    selector = _selector(spec.get("podSelector"), f"{where}: spec.podSelector")
    types = spec.get("policyTypes") or []
    if not isinstance(types, list) or any(t not in (TYPE_INGRESS, TYPE_EGRESS) for t in types):
        raise Malformed(f"{where}: spec.policyTypes {types!r} must list Ingress and/or Egress")
    if not types:
        # k8s.io/kubernetes pkg/apis/networking/v1 SetDefaults_NetworkPolicySpec: Ingress always,
        # Egress only if the policy has egress rules (len(spec.Egress) != 0).
        egress = spec.get("egress")
        types = [TYPE_INGRESS, TYPE_EGRESS] if isinstance(egress, list) and egress else [TYPE_INGRESS]
    kinds = tuple(t for t in (TYPE_INGRESS, TYPE_EGRESS) if t in types)
    ingress = _rules(spec, "ingress", namespace, where, warnings) if TYPE_INGRESS in kinds else ()
    egress = _rules(spec, "egress", namespace, where, warnings) if TYPE_EGRESS in kinds else ()
    return Policy(namespace, name, selector, kinds, ingress, egress)


# What one datastore object says, decoded once (an informer keeps these): the value, and
# warnings about the parts of it the compiler cannot use.
@dataclass(frozen=True)
class PodSource:
    pod: Pod  # without the addresses of its endpoints
    status_addresses: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    # For the node's guards, not the compiler: the prefixes its annotation lets it send from,
    # or why the annotation cannot be used (it then allows nothing extra).
    source_prefixes: tuple[str, ...] = ()
    source_prefixes_problem: str = ""


@dataclass(frozen=True)
class PolicySource:
    policy: Policy
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class EndpointSource:
    """A WorkloadEndpoint, as policy needs it: whose addresses, on which node."""

    namespace: str
    pod: str
    node: str
    addresses: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def decode_pod(obj: Any) -> PodSource:
    """Raises Malformed for a pod the compiler cannot use at all."""
    warnings: list[str] = []
    pod, status_ips = parse_pod(obj, warnings)
    try:
        prefixes, problem = allowed_source_prefixes(obj["metadata"].get("annotations")), ""
    except SourcePrefixesError as exc:
        prefixes, problem = (), str(exc)
    return PodSource(pod, tuple(status_ips), tuple(warnings), prefixes, problem)


def decode_policy(obj: Any) -> PolicySource:
    """Raises Malformed for a policy the compiler ignores whole."""
    warnings: list[str] = []
    policy = parse_policy(obj, warnings)
    return PolicySource(policy, tuple(warnings))


def decode_endpoint(obj: Any) -> EndpointSource:
    warnings: list[str] = []
    namespace, pod, node, ips = parse_endpoint(obj, warnings)
    return EndpointSource(namespace, pod, node, tuple(ips), tuple(warnings))


def assemble_inputs(
    namespaces: Iterable[Namespace],
    pods: Iterable[PodSource],
    policies: Iterable[PolicySource],
    endpoints: Iterable[EndpointSource],
    warnings: Iterable[str] = (),
) -> PolicyInputs:
    """Compiler inputs from decoded objects: a pod's addresses are its status's and its
    endpoints' together; an endpoint without a Pod object is a pod with no labels; a namespace
    without a Namespace object exists with its name label."""
    notes = list(warnings)
    found_namespaces = {ns.name: ns for ns in namespaces}
    found_pods: dict[tuple[str, str], Pod] = {}
    addresses: dict[tuple[str, str], list[str]] = {}
    for pod_source in pods:
        pod = pod_source.pod
        found_pods[(pod.namespace, pod.name)] = pod
        addresses.setdefault((pod.namespace, pod.name), []).extend(pod_source.status_addresses)
        notes.extend(pod_source.warnings)
    nodes: dict[tuple[str, str], str] = {}
    for ep in endpoints:
        addresses.setdefault((ep.namespace, ep.pod), []).extend(ep.addresses)
        nodes.setdefault((ep.namespace, ep.pod), ep.node)
        notes.extend(ep.warnings)

    out_pods: list[Pod] = []
    for key in sorted(addresses):
        pod = found_pods.get(key) or Pod(key[0], key[1], node=nodes.get(key, ""))
        unique = tuple(sorted(set(addresses[key]), key=lambda a: (ipaddress.ip_address(a).version, a)))
        out_pods.append(Pod(pod.namespace, pod.name, pod.labels, unique, pod.named_ports, pod.node))

    out_policies: list[Policy] = []
    for source in policies:
        out_policies.append(source.policy)
        notes.extend(source.warnings)
    out_policies.sort(key=lambda p: (p.namespace, p.name))

    for name in {p.namespace for p in out_pods} | {p.namespace for p in out_policies}:
        if name not in found_namespaces:
            found_namespaces[name] = Namespace(name, ((NAMESPACE_NAME_LABEL, name),))
    return PolicyInputs(
        namespaces=tuple(found_namespaces[n] for n in sorted(found_namespaces)),
        pods=tuple(out_pods),
        policies=tuple(out_policies),
        warnings=tuple(notes),
    )


def inputs_from_objects(
    namespaces: Iterable[Any],
    pods: Iterable[Any],
    policies: Iterable[Any],
    endpoints: Iterable[Any],
) -> PolicyInputs:
    """Typed compiler inputs from datastore objects; malformed objects become warnings.

    >>> inputs = inputs_from_objects(
    ...     [{"kind": "Namespace", "metadata": {"name": "x"}}],
    ...     [{"kind": "Pod", "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
    ...       "status": {"podIPs": [{"ip": "10.244.1.5"}]}}],
    ...     [], [])
    >>> inputs.pods[0].addresses
    ('10.244.1.5',)
    """
    warnings: list[str] = []

    def each(objects: Iterable[Any], decode: Any, skipped: str) -> list[Any]:
        out = []
        for obj in objects:
            try:
                out.append(decode(obj))
            except Malformed as exc:
                warnings.append(f"{exc}; {skipped}")
        return out

    return assemble_inputs(
        each(namespaces, parse_namespace, "skipped"),
        each(pods, decode_pod, "skipped"),
        each(policies, decode_policy, "the policy is ignored"),
        each(endpoints, decode_endpoint, "skipped"),
        warnings,
    )
