"""Admission: defaulting and validation of what users write, as the Kubernetes API server does.

Invariants (each guarded by a test in tests/unit/test_validation.py):
- nothing reaches the datastore that the API server would refuse: the same YAML is accepted or
  refused by `tulle apply` and by `kubectl apply`, with the API server's messages (field path,
  error type, value, reason: `spec.ingress[0].ports[0].endPort: Invalid value: 79: ...`);
- a field the schema does not know is refused, never silently dropped (kubectl's strict field
  validation), so a misspelt `namespaceSelecter` cannot widen a policy;
- IP pools never share an address, and a pool's cidr and blockSize never change once it exists
  (blocks and addresses are handed out from it);
- an update of a Pod changes its spec only where the API server's ValidatePodUpdate lets it
  (images, activeDeadlineSeconds, added tolerations, removed schedulingGates, ...); every
  other changed field is named, `field is immutable`, and nothing is written;
- a namespaced object is written only into a namespace that exists.

`admit(obj, store)` checks one object; `admit_all(objects, store)` checks a batch (one
`tulle apply -f`), in which a Namespace or IPPool may be created alongside the objects that
need it. Pass `admit_all` to `ResourceStore.apply_many` so that what admission read guards the
commit. Without a store only the object itself is checked (no namespace, pool or update checks).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tulle.model.kinds import IP_POOL, NAMESPACE, NETWORK_POLICY, POD, Kind, Obj, Reader, by_kind
from tulle.model.pools import NO_VALUE, Pool, PoolError, check_no_overlap, parse_pool
from tulle.model.protocols import KUBERNETES_PROTOCOL_NAMES

# The kinds users write; Nodes and WorkloadEndpoints are written by the agents.
ADMITTED: tuple[Kind, ...] = (NAMESPACE, POD, NETWORK_POLICY, IP_POOL)

# Namespaces every Kubernetes cluster has; objects may go into them before their Namespace
# object is written (`system_namespaces()` gives the objects, for `tulle lab up` to write).
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
POLICY_TYPES = ("Ingress", "Egress")
MAX_ANNOTATIONS_BYTES = 256 * 1024


# --- field errors, worded as k8s.io/apimachinery/pkg/util/validation/field words them ---------

REQUIRED = "Required value"
INVALID = "Invalid value"
NOT_SUPPORTED = "Unsupported value"
DUPLICATE = "Duplicate value"
FORBIDDEN = "Forbidden"
TOO_LONG = "Too long"
UNKNOWN = "unknown field"

_NO_VALUE = object()


def _show(value: Any) -> str:
    """A bad value as the API server prints it: strings quoted, numbers bare, the rest as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return "null"
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class FieldError:
    """One refused field: `spec.ingress[0].ports[0].port: Invalid value: 0: must be between...`."""

    type: str
    field: str
    value: Any = _NO_VALUE
    detail: str = ""

    def __str__(self) -> str:
        if self.type == UNKNOWN:
            return f'unknown field "{self.field}"'
        body = self.type
        if self.value is not _NO_VALUE:
            body += f": {_show(self.value)}"
        if self.detail:
            body += f": {self.detail}"
        return f"{self.field}: {body}"


def required(field: str, detail: str = "") -> FieldError:
    return FieldError(REQUIRED, field, detail=detail)


def invalid(field: str, value: Any, detail: str) -> FieldError:
    return FieldError(INVALID, field, value, detail)


def not_supported(field: str, value: Any, supported: Sequence[str]) -> FieldError:
    listed = ", ".join(f'"{s}"' for s in supported)
    return FieldError(NOT_SUPPORTED, field, value, f"supported values: {listed}")


def duplicate(field: str, value: Any) -> FieldError:
    return FieldError(DUPLICATE, field, value)


def forbidden(field: str, detail: str) -> FieldError:
    return FieldError(FORBIDDEN, field, detail=detail)


# --- errors ------------------------------------------------------------------------------------


class AdmissionError(Exception):
    """An object refused; `reason` is the Kubernetes status reason, as kubectl shows it in
    `Error from server (Invalid): ...`: Invalid, BadRequest, NotFound or Forbidden."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def group_kind(kind: Kind) -> str:
    """`NetworkPolicy.networking.k8s.io`, `Pod`: the kind as the API server names it in errors."""
    group = kind.api_version.rpartition("/")[0]
    return f"{kind.kind}.{group}" if group else kind.kind


class ValidationError(AdmissionError):
    """Refused fields of one object, all of them, in one message as the API server writes it:
    `NetworkPolicy.networking.k8s.io "x" is invalid: [spec.podSelector: Required value, ...]`.

    Unknown fields are refused before anything else is looked at, with the message of the API
    server's strict decoding (reason BadRequest)."""

    def __init__(self, kind: Kind, name: str, errors: Sequence[FieldError]) -> None:
        self.kind = kind
        self.name = name
        self.errors = list(errors)
        listed = ", ".join(str(e) for e in self.errors)
        if all(e.type == UNKNOWN for e in self.errors):
            version = kind.api_version.rpartition("/")[2]
            message = (
                f'{kind.kind} in version "{version}" cannot be handled as a {kind.kind}: '
                f"strict decoding error: {listed}"
            )
            super().__init__("BadRequest", message)
            return
        if len(self.errors) > 1:
            listed = f"[{listed}]"
        super().__init__("Invalid", f'{group_kind(kind)} "{name}" is invalid: {listed}')


class AdmissionErrors(Exception):
    """Some objects of a batch were refused; `errors` holds (index in the batch, error)."""

    def __init__(self, errors: Sequence[tuple[int, AdmissionError]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"object {i + 1}: {e}" for i, e in self.errors))


# --- names, labels and ports: k8s.io/apimachinery/pkg/util/validation -------------------------

_QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE_FMT = f"({_QUALIFIED_NAME_FMT})?"
_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = rf"{_DNS1123_LABEL_FMT}(\.{_DNS1123_LABEL_FMT})*"


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    shown = " or ".join(f"'{e}', " for e in examples)
    return f"{msg} (e.g. {shown}regex used for validation is '{fmt}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


def _matches(fmt: str, value: str) -> bool:
    return re.fullmatch(fmt, value) is not None


def dns1123_label(value: str) -> list[str]:
    """Why value is not an RFC 1123 label (a Namespace name, a container name); [] if it is."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not _matches(_DNS1123_LABEL_FMT, value):
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
                "and must start and end with an alphanumeric character",
                _DNS1123_LABEL_FMT,
                "my-name",
                "123-abc",
            )
        )
    return errs


def dns1123_subdomain(value: str) -> list[str]:
    """Why value is not an RFC 1123 subdomain (most object names); [] if it is."""
    errs = []
    if len(value) > 253:
        errs.append(_max_len(253))
    if not _matches(_DNS1123_SUBDOMAIN_FMT, value):
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                "'.', and must start and end with an alphanumeric character",
                _DNS1123_SUBDOMAIN_FMT,
                "example.com",
            )
        )
    return errs


def _qualified_name_error() -> str:
    return _regex_error(
        "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
        "alphanumeric character",
        _QUALIFIED_NAME_FMT,
        "MyName",
        "my.name",
        "123-abc",
    )


def qualified_name(value: str) -> list[str]:
    """Why value is not a label key (`name` or `dns.subdomain/name`); [] if it is."""
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs += [f"prefix part {m}" for m in dns1123_subdomain(prefix)]
    else:
        return [
            "a qualified name "
            + _qualified_name_error()
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append(f"name part {_max_len(63)}")
    if not _matches(_QUALIFIED_NAME_FMT, name):
        errs.append("name part " + _qualified_name_error())
    return errs


def label_value(value: str) -> list[str]:
    """Why value is not a label value; [] if it is (the empty string is one)."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not _matches(_LABEL_VALUE_FMT, value):
        errs.append(
            _regex_error(
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                "'.', and must start and end with an alphanumeric character",
                _LABEL_VALUE_FMT,
                "MyValue",
                "my_value",
                "12345",
            )
        )
    return errs


def port_name(value: str) -> list[str]:
    """Why value is not an IANA_SVC_NAME (a named port); [] if it is."""
    errs = []
    if len(value) > 15:
        errs.append(_max_len(15))
    if not re.fullmatch("[-a-z0-9]+", value):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search("[a-z]", value):
        errs.append("must contain at least one letter (a-z)")
    if "--" in value:
        errs.append("must not contain consecutive hyphens")
    if value.startswith("-") or value.endswith("-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def port_number(value: int) -> list[str]:
    return [] if 1 <= value <= 65535 else ["must be between 1 and 65535, inclusive"]


# --- the schemas: which fields exist (strict decoding) ----------------------------------------

# A schema is a dict of known field names (each with the schema of its value), a one-element
# list (an array of that schema), or None (anything: a map with free keys, or a field whose
# inside Tulle does not look at, such as a container's securityContext).
Schema = dict[str, Any] | list[Any] | None


def _opaque(names: str) -> dict[str, Any]:
    """Known fields whose values Tulle does not look into."""
    return dict.fromkeys(names.split())


_OBJECT_META: Schema = _opaque(
    "name generateName namespace selfLink uid resourceVersion generation creationTimestamp "
    "deletionTimestamp deletionGracePeriodSeconds labels annotations ownerReferences finalizers "
    "managedFields"
)
_SELECTOR: Schema = {
    "matchLabels": None,
    "matchExpressions": [{"key": None, "operator": None, "values": None}],
}
_POLICY_PORT: Schema = {"protocol": None, "port": None, "endPort": None}
_PEER: Schema = {
    "podSelector": _SELECTOR,
    "namespaceSelector": _SELECTOR,
    "ipBlock": {"cidr": None, "except": None},
}
_CONTAINER_PORT: Schema = {
    "name": None,
    "hostPort": None,
    "containerPort": None,
    "protocol": None,
    "hostIP": None,
}
_CONTAINER: Schema = {
    **_opaque(
        "name image command args workingDir envFrom env resources resizePolicy restartPolicy "
        "volumeMounts volumeDevices livenessProbe readinessProbe startupProbe lifecycle "
        "terminationMessagePath terminationMessagePolicy imagePullPolicy securityContext stdin "
        "stdinOnce tty"
    ),
    "ports": [_CONTAINER_PORT],
}
_POD_SPEC: Schema = {
    **_opaque(
        "volumes ephemeralContainers restartPolicy terminationGracePeriodSeconds "
        "activeDeadlineSeconds dnsPolicy nodeSelector serviceAccountName serviceAccount "
        "automountServiceAccountToken nodeName hostNetwork hostPID hostIPC shareProcessNamespace "
        "securityContext imagePullSecrets hostname subdomain affinity schedulerName tolerations "
        "hostAliases priorityClassName priority dnsConfig readinessGates runtimeClassName "
        "enableServiceLinks preemptionPolicy overhead topologySpreadConstraints setHostnameAsFQDN "
        "os hostUsers schedulingGates resourceClaims resources"
    ),
    "containers": [_CONTAINER],
    "initContainers": [_CONTAINER],
}


def _top(spec: Schema, status: bool) -> Schema:
    fields: dict[str, Any] = {"apiVersion": None, "kind": None, "metadata": _OBJECT_META, "spec": spec}
    if status:
        fields["status"] = None
    return fields


_SCHEMAS: dict[str, Schema] = {
    NAMESPACE.kind: _top({"finalizers": None}, status=True),
    POD.kind: _top(_POD_SPEC, status=True),
    NETWORK_POLICY.kind: _top(
        {
            "podSelector": _SELECTOR,
            "ingress": [{"from": [_PEER], "ports": [_POLICY_PORT]}],
            "egress": [{"to": [_PEER], "ports": [_POLICY_PORT]}],
            "policyTypes": None,
        },
        status=False,
    ),
    # the fields tulle.model.pools.parse_pool reads; status for whatever reports on a pool
    IP_POOL.kind: _top({"cidr": None, "blockSize": None}, status=True),
}


def _unknown_fields(value: Any, schema: Schema, path: str) -> list[FieldError]:
    """Fields the schema does not know, as strict decoding names them: `spec.ingress[0].foo`."""
    out: list[FieldError] = []
    if isinstance(schema, dict) and isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if key not in schema:
                out.append(FieldError(UNKNOWN, here))
            else:
                out += _unknown_fields(item, schema[key], here)
    elif isinstance(schema, list) and isinstance(value, list):
        for i, item in enumerate(value):
            out += _unknown_fields(item, schema[0], f"{path}[{i}]")
    return out


# --- typed access that reports the wrong type instead of failing ------------------------------


class _Errors(list[FieldError]):
    """The errors of one object; the accessors below add to it when a field has the wrong type."""

    def object(self, value: Any, path: str) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.append(invalid(path, value, "must be an object"))
            return None
        return value

    def array(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.append(invalid(path, value, "must be an array"))
            return []
        return value

    def string(self, value: Any, path: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.append(invalid(path, value, "must be a string"))
            return None
        return value

    def integer(self, value: Any, path: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.append(invalid(path, value, "must be an integer"))
            return None
        return value

    def labels(self, value: Any, path: str) -> None:
        """A map of labels (metadata.labels, matchLabels): errors name the map, as the API server does."""
        labels = self.object(value, path)
        for key, val in sorted((labels or {}).items(), key=lambda kv: str(kv[0])):
            if not isinstance(key, str):
                self.append(invalid(path, key, "must be a string"))
                continue
            self.extend([invalid(path, key, msg) for msg in qualified_name(key)])
            if not isinstance(val, str):
                self.append(invalid(f"{path}[{key}]", val, "must be a string (quote it in YAML)"))
                continue
            self.extend([invalid(path, val, msg) for msg in label_value(val)])

    def selector(self, value: Any, path: str) -> None:
        """A metav1.LabelSelector (podSelector, namespaceSelector)."""
        sel = self.object(value, path)
        if sel is None:
            return
        self.labels(sel.get("matchLabels"), f"{path}.matchLabels")
        for i, raw in enumerate(self.array(sel.get("matchExpressions"), f"{path}.matchExpressions")):
            here = f"{path}.matchExpressions[{i}]"
            expr = self.object(raw, here)
            if expr is None:
                self.append(required(here))
                continue
            operator = expr.get("operator")
            values = self.array(expr.get("values"), f"{here}.values")
            if operator in ("In", "NotIn"):
                if not values:
                    self.append(required(f"{here}.values", "must be specified when `operator` is 'In' or 'NotIn'"))
            elif operator in ("Exists", "DoesNotExist"):
                if values:
                    self.append(
                        forbidden(
                            f"{here}.values",
                            "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                        )
                    )
            else:
                shown = "" if operator is None else operator
                self.append(invalid(f"{here}.operator", shown, "not a valid selector operator"))
            key = self.string(expr.get("key"), f"{here}.key")
            self.extend([invalid(f"{here}.key", key or "", msg) for msg in qualified_name(key or "")])
            for j, val in enumerate(values):
                text = self.string(val, f"{here}.values[{j}]")
                if text is not None:
                    self.extend([invalid(f"{here}.values[{j}]", text, msg) for msg in label_value(text)])


# --- defaulting ---------------------------------------------------------------------------------


def _default_protocols(ports: Any) -> None:
    for port in ports if isinstance(ports, list) else []:
        if isinstance(port, dict) and not port.get("protocol"):
            port["protocol"] = "TCP"


def _default(obj: Obj, kind: Kind) -> Obj:
    """What the API server fills in before it validates (SetDefaults_* and the registry)."""
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    if kind.namespaced:
        if not meta.get("namespace"):
            meta["namespace"] = "default"
    else:
        meta.pop("namespace", None)  # the API server drops it on cluster-scoped kinds
    spec = out.get("spec")
    if kind is NAMESPACE:
        _default_namespace_labels(meta)
    elif kind is POD and isinstance(spec, dict):
        _default_pod(spec)
    elif kind is NETWORK_POLICY and isinstance(spec, dict):
        _default_network_policy(spec)
    elif kind is IP_POOL and isinstance(spec, dict) and spec.get("blockSize") is None:
        # written down, so that a later change of the default cannot change a pool's blocks
        try:
            spec["blockSize"] = parse_pool(out).block_size
        except PoolError:
            pass
    return out


def _default_namespace_labels(meta: dict[str, Any]) -> None:
    name = meta.get("name")
    labels = meta.get("labels")
    if isinstance(name, str) and not dns1123_label(name) and isinstance(labels, dict | None):
        # always the name, whatever was given: namespaceSelectors rely on it
        meta["labels"] = {**(labels or {}), NAMESPACE_NAME_LABEL: name}


def _list_of(value: Any) -> list[Any]:
    """`value` if it is a list, else nothing to default: validation reports the wrong type."""
    return value if isinstance(value, list) else []


def _default_pod(spec: dict[str, Any]) -> None:
    for field in ("containers", "initContainers"):
        for container in _list_of(spec.get(field)):
            if isinstance(container, dict):
                _default_protocols(container.get("ports"))


def _default_network_policy(spec: dict[str, Any]) -> None:
    if "podSelector" in spec and spec["podSelector"] is None:
        spec["podSelector"] = {}
    for direction in ("ingress", "egress"):
        for rule in _list_of(spec.get(direction)):
            if isinstance(rule, dict):
                _default_protocols(rule.get("ports"))
    if not spec.get("policyTypes"):
        # SetDefaults_NetworkPolicy: Ingress always, Egress when there are egress rules
        egress = spec.get("egress")
        spec["policyTypes"] = ["Ingress", "Egress"] if isinstance(egress, list) and egress else ["Ingress"]


# --- validation ---------------------------------------------------------------------------------


def _validate_meta(meta: dict[str, Any], kind: Kind, errs: _Errors) -> None:
    name = meta.get("name")
    if name is None or name == "":
        errs.append(required("metadata.name", "name or generateName is required"))
    elif (text := errs.string(name, "metadata.name")) is not None:
        check = dns1123_label if kind is NAMESPACE else dns1123_subdomain
        errs += [invalid("metadata.name", text, msg) for msg in check(text)]
    if kind.namespaced:
        namespace = errs.string(meta.get("namespace"), "metadata.namespace")
        if namespace is not None:
            errs += [invalid("metadata.namespace", namespace, msg) for msg in dns1123_label(namespace)]
    errs.labels(meta.get("labels"), "metadata.labels")
    annotations = errs.object(meta.get("annotations"), "metadata.annotations") or {}
    size = 0
    for key, val in sorted(annotations.items(), key=lambda kv: str(kv[0])):
        if not isinstance(key, str):
            errs.append(invalid("metadata.annotations", key, "must be a string"))
            continue
        errs += [invalid("metadata.annotations", key, msg) for msg in qualified_name(key.lower())]
        if errs.string(val, f"metadata.annotations[{key}]") is not None:
            size += len(key) + len(val)
    if size > MAX_ANNOTATIONS_BYTES:
        errs.append(
            FieldError(TOO_LONG, "metadata.annotations", detail=f"must have at most {MAX_ANNOTATIONS_BYTES} bytes")
        )


def _validate_container(raw: Any, path: str, names: set[str], port_names: set[str], errs: _Errors) -> None:
    container = errs.object(raw, path)
    if container is None:
        errs.append(required(path))
        return
    name = errs.string(container.get("name"), f"{path}.name")
    if not name:
        errs.append(required(f"{path}.name"))
    else:
        _validate_unique_name(name, f"{path}.name", dns1123_label, names, errs)
    if not errs.string(container.get("image"), f"{path}.image"):
        errs.append(required(f"{path}.image"))
    for j, raw_port in enumerate(errs.array(container.get("ports"), f"{path}.ports")):
        _validate_container_port(raw_port, f"{path}.ports[{j}]", port_names, errs)


def _validate_unique_name(
    name: str, path: str, check: Callable[[str], list[str]], seen: set[str], errs: _Errors
) -> None:
    """A name that must pass `check` and not be in `seen`; a valid new one is added to `seen`."""
    if msgs := check(name):
        errs += [invalid(path, name, msg) for msg in msgs]
    elif name in seen:
        errs.append(duplicate(path, name))
    else:
        seen.add(name)


def _validate_container_port(raw: Any, path: str, port_names: set[str], errs: _Errors) -> None:
    port = errs.object(raw, path)
    if port is None:
        errs.append(required(path))
        return
    name = errs.string(port.get("name"), f"{path}.name")
    if name:  # optional; when given, unique across the pod's containers
        _validate_unique_name(name, f"{path}.name", port_name, port_names, errs)
    number = errs.integer(port.get("containerPort"), f"{path}.containerPort")
    if "containerPort" not in port or number == 0:
        errs.append(required(f"{path}.containerPort"))
    elif number is not None:
        errs += [invalid(f"{path}.containerPort", number, msg) for msg in port_number(number)]
    host_port = errs.integer(port.get("hostPort"), f"{path}.hostPort")
    if host_port:
        errs += [invalid(f"{path}.hostPort", host_port, msg) for msg in port_number(host_port)]
    protocol = port.get("protocol")
    if protocol not in KUBERNETES_PROTOCOL_NAMES:
        errs.append(not_supported(f"{path}.protocol", protocol, KUBERNETES_PROTOCOL_NAMES))


def _validate_pod(spec: dict[str, Any], errs: _Errors) -> None:
    # Container names are unique across init and app containers; port names across the pod, so
    # that a policy's named port means one number.
    names: set[str] = set()
    port_names: set[str] = set()
    if spec.get("containers") in (None, []):
        errs.append(required("spec.containers"))
    for field in ("containers", "initContainers"):
        for i, raw in enumerate(errs.array(spec.get(field), f"spec.{field}")):
            _validate_container(raw, f"spec.{field}[{i}]", names, port_names, errs)


def _validate_policy_port(raw: Any, path: str, errs: _Errors) -> None:
    port = errs.object(raw, path)
    if port is None:
        return
    protocol = port.get("protocol")
    if protocol not in KUBERNETES_PROTOCOL_NAMES:
        errs.append(not_supported(f"{path}.protocol", protocol, KUBERNETES_PROTOCOL_NAMES))
    value = port.get("port")
    end = errs.integer(port.get("endPort"), f"{path}.endPort")
    if value is None:
        if end is not None:
            errs.append(invalid(f"{path}.endPort", end, "may not be specified when `port` is not specified"))
    elif isinstance(value, int) and not isinstance(value, bool):
        errs += [invalid(f"{path}.port", value, msg) for msg in port_number(value)]
        if end is not None:
            if end < value:
                errs.append(invalid(f"{path}.endPort", end, "must be greater than or equal to port"))
            errs += [invalid(f"{path}.endPort", end, msg) for msg in port_number(end)]
    elif isinstance(value, str):
        if end is not None:
            errs.append(invalid(f"{path}.endPort", end, "may not be specified when `port` is non-numeric"))
        errs += [invalid(f"{path}.port", value, msg) for msg in port_name(value)]
    else:
        errs.append(invalid(f"{path}.port", value, "must be a port number or a port name"))


def _cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A CIDR as Go's net.ParseCIDR reads it: host bits may be set (10.0.0.1/24 is 10.0.0.0/24)."""
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


_NOT_A_CIDR = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"


def _validate_ip_block(block: dict[str, Any], path: str, errs: _Errors) -> None:
    if block.get("cidr") in (None, ""):
        errs.append(required(f"{path}.cidr"))
        return
    text = errs.string(block.get("cidr"), f"{path}.cidr")
    if text is None:
        return
    cidr = _cidr(text)
    if cidr is None:
        errs.append(invalid(f"{path}.cidr", text, _NOT_A_CIDR))
        return
    for i, raw in enumerate(errs.array(block.get("except"), f"{path}.except")):
        here = f"{path}.except[{i}]"
        except_text = errs.string(raw, here)
        if except_text is None:
            continue
        inner = _cidr(except_text)
        if inner is None:
            errs.append(invalid(here, except_text, _NOT_A_CIDR))
        elif (
            inner.version != cidr.version
            or not cidr.supernet_of(inner)  # type: ignore[arg-type]
            or inner.prefixlen <= cidr.prefixlen
        ):
            errs.append(invalid(here, except_text, "must be a strict subset of `cidr`"))


def _validate_peer(raw: Any, path: str, errs: _Errors) -> None:
    peer = errs.object(raw, path) or {}
    present = [field for field in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(field) is not None]
    if "podSelector" in present:
        errs.selector(peer["podSelector"], f"{path}.podSelector")
    if "namespaceSelector" in present:
        errs.selector(peer["namespaceSelector"], f"{path}.namespaceSelector")
    if "ipBlock" in present and (block := errs.object(peer["ipBlock"], f"{path}.ipBlock")) is not None:
        _validate_ip_block(block, f"{path}.ipBlock", errs)
    if not present:
        errs.append(required(path, "must specify a peer"))
    elif len(present) > 1 and "ipBlock" in present:
        errs.append(forbidden(path, "may not specify both ipBlock and another peer"))


def _validate_network_policy(spec: dict[str, Any], errs: _Errors) -> None:
    if "podSelector" not in spec:
        errs.append(required("spec.podSelector", "may be {} to select every pod in the namespace"))
    else:
        errs.selector(spec["podSelector"], "spec.podSelector")
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for i, raw in enumerate(errs.array(spec.get(direction), f"spec.{direction}")):
            here = f"spec.{direction}[{i}]"
            rule = errs.object(raw, here) or {}
            for j, port in enumerate(errs.array(rule.get("ports"), f"{here}.ports")):
                _validate_policy_port(port, f"{here}.ports[{j}]", errs)
            for j, peer in enumerate(errs.array(rule.get(peers), f"{here}.{peers}")):
                _validate_peer(peer, f"{here}.{peers}[{j}]", errs)
    types = errs.array(spec.get("policyTypes"), "spec.policyTypes")
    if len(types) > len(POLICY_TYPES):
        errs.append(invalid("spec.policyTypes", types, "may not specify more than two policyTypes"))
        return
    seen: set[str] = set()
    for i, value in enumerate(types):
        here = f"spec.policyTypes[{i}]"
        if value not in POLICY_TYPES:
            errs.append(not_supported(here, value, POLICY_TYPES))
        elif value in seen:
            errs.append(duplicate(here, value))
        else:
            seen.add(value)  # one of POLICY_TYPES: a string, never an unhashable list or object


def _pool_error(err: PoolError) -> FieldError:
    """A pool's error as the API server words a field error (`FIELD: Invalid value: "V": WHY`)."""
    if err.error_type == UNKNOWN:
        return FieldError(UNKNOWN, err.field)
    value = _NO_VALUE if err.value is NO_VALUE else err.value
    return FieldError(err.error_type, err.field, value, err.detail)


def _validate_ip_pool(spec: dict[str, Any] | None, obj: Obj, errs: _Errors) -> Pool | None:
    if spec is None:
        errs.append(required("spec"))
        return None
    if spec.get("cidr") in (None, ""):
        errs.append(required("spec.cidr"))
        return None
    cidr = errs.string(spec.get("cidr"), "spec.cidr")
    if cidr is None:
        return None
    if _cidr(cidr) is None:
        errs.append(invalid("spec.cidr", cidr, _NOT_A_CIDR))
        return None
    if errs:
        return None
    try:
        return parse_pool(obj)
    except PoolError as err:
        errs.append(_pool_error(err))
        return None


def _validate(obj: Obj, kind: Kind) -> tuple[_Errors, Pool | None]:
    errs = _Errors()
    meta = errs.object(obj.get("metadata"), "metadata")
    if meta is None:
        errs.append(required("metadata.name", "name or generateName is required"))
        return errs, None
    _validate_meta(meta, kind, errs)
    spec_value = obj.get("spec")
    spec = errs.object(spec_value, "spec")
    pool = None
    well_formed = spec is not None or spec_value is None
    if kind is POD and well_formed:
        _validate_pod(spec or {}, errs)
    elif kind is NETWORK_POLICY and well_formed:
        _validate_network_policy(spec or {}, errs)
    elif kind is NAMESPACE:
        errs.array((spec or {}).get("finalizers"), "spec.finalizers")
    elif kind is IP_POOL and well_formed:
        pool = _validate_ip_pool(spec, obj, errs)
    return errs, pool


# --- admission ----------------------------------------------------------------------------------


def _kind_of(obj: Any) -> Kind:
    if not isinstance(obj, dict):
        raise AdmissionError("BadRequest", f"an object must be a mapping with apiVersion and kind, not {_show(obj)}")
    api_version, kind_name = obj.get("apiVersion"), obj.get("kind")
    missing = [name for name, value in (("apiVersion", api_version), ("kind", kind_name)) if not value]
    if missing:
        raise AdmissionError("BadRequest", f"error validating data: [{', '.join(f'{m} not set' for m in missing)}]")
    kind = by_kind(kind_name) if isinstance(kind_name, str) else None
    if kind is None or kind.api_version != api_version:
        raise AdmissionError("BadRequest", f'no matches for kind "{kind_name}" in version "{api_version}"')
    if kind not in ADMITTED:
        raise AdmissionError(
            "Forbidden",
            f"{kind.plural} are written by the Tulle agents, not applied: "
            f"the kinds to apply are {', '.join(k.kind for k in ADMITTED)}",
        )
    return kind


def _name_of(obj: Obj) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def _admit_alone(obj: Any) -> tuple[Kind, Obj, Pool | None]:
    """Decode, default and validate one object, with nothing but the object to go by."""
    kind = _kind_of(obj)
    unknown = _unknown_fields(obj, _SCHEMAS[kind.kind], "")
    if unknown:
        raise ValidationError(kind, _name_of(obj), unknown)
    if not isinstance(obj.get("metadata", {}), dict):
        raise ValidationError(kind, "", [invalid("metadata", obj["metadata"], "must be an object")])
    defaulted = _default(obj, kind)
    errs, pool = _validate(defaulted, kind)
    if errs:
        raise ValidationError(kind, _name_of(defaulted), errs)
    return kind, defaulted, pool


def _stored_pool(obj: Obj) -> Pool | None:
    try:
        return parse_pool(obj)
    except PoolError:
        return None  # a broken stored pool hands out nothing; do not let it block new ones


def admit_all(objects: Sequence[Any], store: Reader | None = None) -> list[Obj]:
    """Default and validate a batch; the batch is refused as a whole if any object is.

    Checks each object, then, with a store, against what is stored and against the rest of the
    batch: the namespace of a namespaced object exists (or is created in the batch, or is one
    of SYSTEM_NAMESPACES); an IPPool overlaps no other pool, stored or in the batch, and keeps
    the cidr and blockSize it was created with. Raises AdmissionErrors with every refused
    object; returns the defaulted objects otherwise.

    >>> admit_all([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}}])[0]["metadata"]
    {'name': 'web', 'labels': {'kubernetes.io/metadata.name': 'web'}}
    """
    errors: list[tuple[int, AdmissionError]] = []
    admitted: list[tuple[int, Kind, Obj, Pool | None]] = []
    for i, obj in enumerate(objects):
        try:
            admitted.append((i, *_admit_alone(obj)))
        except AdmissionError as err:
            errors.append((i, err))
    if store is not None:
        errors += _check_against(admitted, store)
    if errors:
        raise AdmissionErrors(sorted(errors, key=lambda e: e[0]))
    return [obj for _, _, obj, _ in admitted]


def _check_against(
    admitted: list[tuple[int, Kind, Obj, Pool | None]], store: Reader
) -> list[tuple[int, AdmissionError]]:
    errors: list[tuple[int, AdmissionError]] = []
    namespaces_in_batch = {obj["metadata"]["name"] for _, kind, obj, _ in admitted if kind is NAMESPACE}
    batch_pools = {obj["metadata"]["name"] for _, kind, obj, _ in admitted if kind is IP_POOL}
    known_namespaces: dict[str, bool] = {}
    stored_pools: list[Pool] | None = None
    earlier_pools: list[Pool] = []
    for i, kind, obj, pool in admitted:
        meta = obj["metadata"]
        if kind.namespaced:
            namespace = meta["namespace"]
            if namespace not in namespaces_in_batch and namespace not in SYSTEM_NAMESPACES:
                if namespace not in known_namespaces:
                    known_namespaces[namespace] = store.get(NAMESPACE, namespace) is not None
                if not known_namespaces[namespace]:
                    errors.append((i, AdmissionError("NotFound", f'namespaces "{namespace}" not found')))
                    continue
        if kind is POD and (refused := _pod_update_refused(obj, store)) is not None:
            errors.append((i, refused))
            continue
        if kind is IP_POOL and pool is not None:
            if stored_pools is None:
                listed, _ = store.list(IP_POOL)
                stored_pools = [p for p in map(_stored_pool, listed) if p is not None and p.name not in batch_pools]
            field_errors = _pool_update_errors(pool, store.get(IP_POOL, pool.name))
            for other in [*stored_pools, *earlier_pools]:
                try:
                    check_no_overlap([other, pool])
                except PoolError as err:
                    field_errors.append(_pool_error(err))
            earlier_pools.append(pool)
            if field_errors:
                errors.append((i, ValidationError(kind, meta["name"], field_errors)))
    return errors


# --- pod updates (ValidatePodUpdate, k8s.io/kubernetes/pkg/apis/core/validation) ---------------

# What the API server lets an update of a Pod change besides labels and annotations; the rest of
# the spec is fixed when the pod is created (status is reported apart, by the kubelet or the lab).
UPDATABLE_POD_SPEC_FIELDS = (
    "`spec.containers[*].image`",
    "`spec.initContainers[*].image`",
    "`spec.activeDeadlineSeconds`",
    "`spec.tolerations` (only additions to existing tolerations)",
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
)
_MAX_INT32 = 2**31 - 1


def _without_zero_values(value: Any) -> Any:
    """A JSON value as Go decodes it for comparison: null, "", false, [] and {} are the zero
    values of their fields, equal to leaving the field out (apiequality.Semantic)."""
    if isinstance(value, dict):
        kept = {k: _without_zero_values(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in (None, "", False, [], {})}
    if isinstance(value, list):
        return [_without_zero_values(v) for v in value]
    return value


def changed_fields(old: Any, new: Any, path: str) -> list[str]:
    """The paths at which two JSON values differ, as field paths (`spec.containers[0].ports`).

    >>> changed_fields({"a": [1, {"b": 2}], "c": 3}, {"a": [1, {"b": 4}], "d": 3}, "spec")
    ['spec.a[1].b', 'spec.c', 'spec.d']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            f
            for key in sorted(set(old) | set(new))
            for f in changed_fields(old.get(key), new.get(key), f"{path}.{key}")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [f for i, (o, n) in enumerate(zip(old, new, strict=True)) for f in changed_fields(o, n, f"{path}[{i}]")]
    return [] if old == new else [path]


def _container_update_errors(new_spec: dict[str, Any], old_spec: dict[str, Any]) -> list[FieldError]:
    errs: list[FieldError] = []
    for field in ("containers", "initContainers"):
        new, old = _list_of(new_spec.get(field)), _list_of(old_spec.get(field))
        if len(new) != len(old):
            return [forbidden(f"spec.{field}", "pod updates may not add or remove containers")]
        for i, container in enumerate(new):
            image = container.get("image") if isinstance(container, dict) else None
            if isinstance(image, str) and image.strip() != image:
                errs.append(invalid(f"spec.{field}[{i}].image", image, "must not have leading or trailing whitespace"))
    return errs


def _deadline_update_errors(new: Any, old: Any) -> list[FieldError]:
    """Set from nothing to a positive value, or lowered; never raised or unset."""
    path = "spec.activeDeadlineSeconds"
    if new is None:
        return [] if old is None else [invalid(path, None, "must not update from a positive integer to nil value")]
    if isinstance(new, bool) or not isinstance(new, int) or not 0 <= new <= _MAX_INT32:
        return [invalid(path, new, f"must be between 0 and {_MAX_INT32}, inclusive")]
    if isinstance(old, int) and old < new:
        return [invalid(path, new, "must be less than or equal to previous value")]
    return []


def _toleration_update_errors(new: list[Any], old: list[Any]) -> list[FieldError]:
    """Tolerations may be added; one there may change only its tolerationSeconds."""

    def fixed(toleration: Any) -> Any:
        rest = dict(toleration) if isinstance(toleration, dict) else toleration
        if isinstance(rest, dict):
            rest.pop("tolerationSeconds", None)
        return _without_zero_values(rest)

    kept = [fixed(t) for t in new]
    if any(fixed(t) not in kept for t in old):
        return [forbidden("spec.tolerations", "existing toleration can not be modified except its tolerationSeconds")]
    return []


def _scheduling_gate_update_errors(new: list[Any], old: list[Any]) -> list[FieldError]:
    """Gates may only be removed (a scheduler waits for them to go)."""
    before = {g.get("name") for g in old if isinstance(g, dict)}
    errs = []
    for i, gate in enumerate(new):
        name = gate.get("name") if isinstance(gate, dict) else gate
        if name not in before:
            errs.append(
                forbidden(
                    f"spec.schedulingGates[{i}].name",
                    f"only deletion is allowed, but found new scheduling gate '{name}'",
                )
            )
    return errs


def pod_update_errors(new: Obj, old: Obj) -> list[FieldError]:
    """Why the API server would refuse `new` as an update of the stored Pod `old` (both defaulted):
    of the spec, only the fields in UPDATABLE_POD_SPEC_FIELDS may change, and those only as
    ValidatePodUpdate allows. Each other field that changed is named: `field is immutable`.

    >>> old = {"spec": {"nodeName": "node1", "containers": [{"name": "main", "image": "busybox"}]}}
    >>> new = {"spec": {"nodeName": "node2", "containers": [{"name": "main", "image": "nginx"}]}}
    >>> [str(e) for e in pod_update_errors(new, old)][0]
    'spec.nodeName: Forbidden: field is immutable'
    """
    new_spec = new.get("spec") if isinstance(new.get("spec"), dict) else {}
    old_spec = old.get("spec") if isinstance(old.get("spec"), dict) else {}
    assert isinstance(new_spec, dict) and isinstance(old_spec, dict)
    errs = _container_update_errors(new_spec, old_spec)
    if any(e.field in ("spec.containers", "spec.initContainers") for e in errs):
        return errs  # containers added or removed: comparing them one by one says nothing more
    errs += _deadline_update_errors(new_spec.get("activeDeadlineSeconds"), old_spec.get("activeDeadlineSeconds"))
    errs += _toleration_update_errors(_list_of(new_spec.get("tolerations")), _list_of(old_spec.get("tolerations")))
    errs += _scheduling_gate_update_errors(
        _list_of(new_spec.get("schedulingGates")), _list_of(old_spec.get("schedulingGates"))
    )
    # What may change is taken from the stored pod; whatever differs after that may not change.
    munged = copy.deepcopy(new_spec)
    for field in ("containers", "initContainers"):
        for container, before in zip(_list_of(munged.get(field)), _list_of(old_spec.get(field)), strict=True):
            if isinstance(container, dict) and isinstance(before, dict):
                container["image"] = before.get("image")
    for field in ("activeDeadlineSeconds", "tolerations", "schedulingGates"):
        munged[field] = old_spec.get(field)
    grace_before = old_spec.get("terminationGracePeriodSeconds")
    if isinstance(grace_before, int) and grace_before < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = grace_before
    changed = changed_fields(_without_zero_values(old_spec), _without_zero_values(munged), "spec")
    errs += [forbidden(path, "field is immutable") for path in changed]
    if changed:
        errs.append(
            forbidden("spec", f"pod updates may not change fields other than {','.join(UPDATABLE_POD_SPEC_FIELDS)}")
        )
    return errs


def _pod_update_refused(pod: Obj, store: Reader) -> ValidationError | None:
    meta = pod["metadata"]
    current = store.get(POD, meta["name"], meta["namespace"])
    if current is None:
        return None
    # stored by a writer that skipped admission, perhaps: compared as the API server stores it
    field_errors = pod_update_errors(pod, _default(current, POD))
    return ValidationError(POD, meta["name"], field_errors) if field_errors else None


def _pool_update_errors(pool: Pool, current: Obj | None) -> list[FieldError]:
    old = _stored_pool(current) if current is not None else None
    if old is None:
        return []
    errs = []
    if old.cidr != pool.cidr:
        errs.append(
            invalid("spec.cidr", str(pool.cidr), f"field is immutable: addresses are handed out from {old.cidr}")
        )
    if old.block_size != pool.block_size:
        errs.append(
            invalid(
                "spec.blockSize",
                pool.block_size,
                f"field is immutable: blocks of /{old.block_size} are claimed from this pool",
            )
        )
    return errs


def admit(obj: Any, store: Reader | None = None) -> Obj:
    """Default and validate one object; raises the AdmissionError (ValidationError for refused
    fields) that the API server would answer with.

    >>> admit({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Web"}})
    Traceback (most recent call last):
    ...
    tulle.model.validation.ValidationError: Namespace "Web" is invalid: metadata.name: ...
    """
    try:
        return admit_all([obj], store)[0]
    except AdmissionErrors as errs:
        raise errs.errors[0][1] from None


def system_namespaces() -> list[Obj]:
    """The Namespaces every cluster has, defaulted, for whoever sets up a datastore to write."""
    return [admit({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}) for name in SYSTEM_NAMESPACES]


def check_delete(kind: Kind, name: str) -> None:
    """Refuse what the API server refuses to delete: the namespaces every cluster has
    (NamespaceLifecycle; Tulle adds kube-node-lease, which admission also takes as always there).

    >>> check_delete(NAMESPACE, "default")
    Traceback (most recent call last):
    ...
    tulle.model.validation.AdmissionError: namespaces "default" is forbidden: ...
    """
    if kind is NAMESPACE and name in SYSTEM_NAMESPACES:
        raise AdmissionError("Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted')
