"""Admission (tulle.model.validation): every defaulting and validation rule, with the API server's words.

Pure: objects in, objects or errors out; the store is an in-memory stand-in.
"""

from __future__ import annotations

import copy
import doctest
from typing import Any

import pytest

from tulle.model import validation
from tulle.model.kinds import NAMESPACE, POD, Kind
from tulle.model.validation import (
    AdmissionError,
    AdmissionErrors,
    ValidationError,
    admit,
    admit_all,
    check_delete,
    system_namespaces,
)

Obj = dict[str, Any]


class MemoryStore:
    """The two reads admission makes, from a dict: (kind, namespace, name) -> object."""

    def __init__(self, *objects: Obj) -> None:
        self.objects: dict[tuple[str, str | None, str], Obj] = {}
        for obj in objects:
            self.objects[self._key(obj)] = obj

    @staticmethod
    def _key(obj: Obj) -> tuple[str, str | None, str]:
        meta = obj["metadata"]
        return obj["kind"], meta.get("namespace"), meta["name"]

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        return self.objects.get((kind.kind, namespace if kind.namespaced else None, name))

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], int]:
        found = [o for (k, ns, _), o in self.objects.items() if k == kind.kind and namespace in (None, ns)]
        return found, 1


def netpol(spec: Any = None, name: str = "x", **meta: Any) -> Obj:
    obj: Obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, **meta},
    }
    obj["spec"] = {"podSelector": {}} if spec is None else spec
    return obj


def ingress_port(**port: Any) -> Obj:
    return netpol({"podSelector": {}, "ingress": [{"ports": [port]}]})


def ingress_peer(**peer: Any) -> Obj:
    return netpol({"podSelector": {}, "ingress": [{"from": [peer]}]})


def pod(containers: Any = None, name: str = "p", **meta: Any) -> Obj:
    if containers is None:
        containers = [{"name": "main", "image": "busybox"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {"containers": containers},
    }


def pod_ports(*ports: Obj) -> Obj:
    return pod([{"name": "main", "image": "busybox", "ports": list(ports)}])


def namespace(name: str = "web", **meta: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, **meta}}


def pool(name: str = "p", cidr: Any = "10.0.0.0/16", **spec: Any) -> Obj:
    return {
        "apiVersion": "tulle.dev/v1",
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"cidr": cidr, **spec},
    }


def refused(obj: Any, store: Any = None) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        admit(obj, store)
    return info.value


def field_errors(obj: Any, store: Any = None) -> list[str]:
    err = refused(obj, store)
    assert isinstance(err, ValidationError), err
    return [str(e) for e in err.errors]


def assert_refused(obj: Any, expected: str, store: Any = None) -> None:
    """The object is refused and one of its errors reads exactly `expected`."""
    errors = field_errors(obj, store)
    assert expected in errors, errors


def test_the_module_examples_run() -> None:
    assert doctest.testmod(validation, optionflags=doctest.ELLIPSIS).failed == 0


# --- the message, as the API server writes it -----------------------------------------------------


def test_message_names_kind_group_name_field_value_and_reason() -> None:
    err = refused(ingress_port(port=80, endPort=79))
    assert err.reason == "Invalid"
    assert str(err) == (
        'NetworkPolicy.networking.k8s.io "x" is invalid: '
        "spec.ingress[0].ports[0].endPort: Invalid value: 79: must be greater than or equal to port"
    )


def test_several_errors_are_listed_in_brackets() -> None:
    err = refused(ingress_port(port=0, protocol="ICMP"))
    assert str(err) == (
        'NetworkPolicy.networking.k8s.io "x" is invalid: ['
        'spec.ingress[0].ports[0].protocol: Unsupported value: "ICMP": '
        'supported values: "SCTP", "TCP", "UDP", '
        "spec.ingress[0].ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive]"
    )


def test_core_kinds_have_no_group_in_the_message() -> None:
    assert str(refused(pod(name="P"))).startswith('Pod "P" is invalid: metadata.name: Invalid value: "P": ')


# --- apiVersion, kind ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("v1", "NetworkPolicy"),
        ("networking.k8s.io/v1beta1", "NetworkPolicy"),
        ("v1", "Service"),
        ("v2", "Pod"),
    ],
)
def test_unknown_apiversion_or_kind_is_refused(api_version: str, kind: str) -> None:
    err = refused({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}})
    assert err.reason == "BadRequest"
    assert str(err) == f'no matches for kind "{kind}" in version "{api_version}"'


def test_missing_apiversion_and_kind_are_named() -> None:
    assert str(refused({"metadata": {"name": "x"}})) == "error validating data: [apiVersion not set, kind not set]"
    assert str(refused({"kind": "Pod"})) == "error validating data: [apiVersion not set]"


def test_an_object_must_be_a_mapping() -> None:
    assert refused(["not", "an", "object"]).reason == "BadRequest"


@pytest.mark.parametrize(
    "obj",
    [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}},
        {"apiVersion": "tulle.dev/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"}},
    ],
)
def test_kinds_the_agents_write_are_not_admitted(obj: Obj) -> None:
    err = refused(obj)
    assert err.reason == "Forbidden"
    assert "written by the Tulle agents" in str(err)


# --- strict fields ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({**netpol(), "extra": 1}, "extra"),
        (netpol({"podSelector": {}, "foo": 1}), "spec.foo"),
        (netpol({"podSelector": {}, "ingress": [{"fromm": []}]}), "spec.ingress[0].fromm"),
        (
            netpol({"podSelector": {}, "egress": [{"to": [{"namespaceSelecter": {}}]}]}),
            "spec.egress[0].to[0].namespaceSelecter",
        ),
        (netpol({"podSelector": {"matchLabel": {}}}), "spec.podSelector.matchLabel"),
        (ingress_port(port=80, portEnd=90), "spec.ingress[0].ports[0].portEnd"),
        (
            ingress_peer(ipBlock={"cidr": "10.0.0.0/8", "exclude": []}),
            "spec.ingress[0].from[0].ipBlock.exclude",
        ),
        (netpol(labelz={}), "metadata.labelz"),
        (netpol(), None),
        (pod([{"name": "m", "image": "i", "portz": []}]), "spec.containers[0].portz"),
        (pod_ports({"containerPort": 80, "proto": "TCP"}), "spec.containers[0].ports[0].proto"),
        ({**pod(), "spec": {"containers": [{"name": "m", "image": "i"}], "nodename": "a"}}, "spec.nodename"),
        ({**namespace(), "spec": {"finalizer": []}}, "spec.finalizer"),
        (pool(natOutgoing=True), "spec.natOutgoing"),
        ({**netpol(), "status": {}}, "status"),
    ],
)
def test_unknown_fields_are_refused_by_path(obj: Obj, field: str | None) -> None:
    if field is None:
        admit(obj)
        return
    err = refused(obj)
    assert err.reason == "BadRequest"
    assert f'strict decoding error: unknown field "{field}"' in str(err)


def test_unknown_fields_are_reported_before_anything_else() -> None:
    err = refused(netpol({"podSelector": {}, "foo": 1, "bar": 2}, name="Bad Name"))
    assert str(err) == (
        'NetworkPolicy in version "v1" cannot be handled as a NetworkPolicy: '
        'strict decoding error: unknown field "spec.foo", unknown field "spec.bar"'
    )


def test_fields_kubernetes_knows_are_accepted_though_tulle_ignores_them() -> None:
    obj = pod(
        [
            {
                "name": "main",
                "image": "busybox",
                "command": ["sleep", "1d"],
                "resources": {"limits": {"cpu": "1"}},
                "securityContext": {"anything": "goes"},
            }
        ]
    )
    obj["spec"].update(restartPolicy="Always", nodeName="node1", tolerations=[])
    obj["metadata"].update(annotations={"example.com/a": "b"}, ownerReferences=[], finalizers=[])
    obj["status"] = {"phase": "Running"}
    assert admit(obj)["spec"]["nodeName"] == "node1"


# --- metadata -----------------------------------------------------------------------------------------


def test_name_is_required() -> None:
    obj = netpol()
    del obj["metadata"]["name"]
    assert field_errors(obj) == ["metadata.name: Required value: name or generateName is required"]
    assert field_errors(netpol(name="")) == ["metadata.name: Required value: name or generateName is required"]


def test_metadata_must_be_an_object() -> None:
    assert str(refused({**netpol(), "metadata": "x"})).endswith('metadata: Invalid value: "x": must be an object')


@pytest.mark.parametrize("make", [lambda n: netpol(name=n), lambda n: pod(name=n), lambda n: pool(name=n)])
def test_names_are_dns_subdomains(make: Any) -> None:
    admit(make("a.b-c.d"))
    assert field_errors(make("Web_1")) == [
        'metadata.name: Invalid value: "Web_1": a lowercase RFC 1123 subdomain must consist of lower case '
        "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. "
        "'example.com', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
    ]
    assert field_errors(make("a" * 254)) == [
        f'metadata.name: Invalid value: "{"a" * 254}": must be no more than 253 characters'
    ]


def test_namespace_names_are_dns_labels() -> None:
    errors = field_errors(namespace("a.b"))
    assert errors[0].startswith(
        'metadata.name: Invalid value: "a.b": a lowercase RFC 1123 label must consist of lower case '
        "alphanumeric characters or '-', and must start and end with an alphanumeric character "
        "(e.g. 'my-name',  or '123-abc'"
    )
    assert (
        field_errors(namespace("a" * 64))[0]
        == f'metadata.name: Invalid value: "{"a" * 64}": must be no more than 63 characters'
    )


def test_namespace_defaults_to_default() -> None:
    assert admit(netpol())["metadata"]["namespace"] == "default"
    assert admit(netpol(namespace=""))["metadata"]["namespace"] == "default"
    assert admit(pod(namespace="web"))["metadata"]["namespace"] == "web"


def test_namespace_of_an_object_must_be_a_dns_label() -> None:
    errors = field_errors(netpol(namespace="Web"))
    assert errors[0].startswith('metadata.namespace: Invalid value: "Web": a lowercase RFC 1123 label')


def test_cluster_scoped_kinds_drop_metadata_namespace() -> None:
    assert "namespace" not in admit(pool())["metadata"]
    assert "namespace" not in admit(namespace(namespace="web"))["metadata"]


TOO_LONG_253 = "must be no more than 253 characters"
RANGE = "must be between 1 and 65535, inclusive"
PROTOCOLS = 'supported values: "SCTP", "TCP", "UDP"'
LABEL_KEY_NAME_PART = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
    "regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


@pytest.mark.parametrize(
    "labels",
    [
        {"app": "web"},
        {"example.com/app": "web"},
        {"a": ""},
        {"A_b.c-D": "X_y.z-1"},
        {"k" * 63: "v" * 63},
        {f"{'p' * 253}/k": "v"},
    ],
)
def test_valid_labels_are_kept(labels: dict[str, str]) -> None:
    assert admit(pod(labels=labels))["metadata"]["labels"] == labels


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"bad key": "v"}, f'metadata.labels: Invalid value: "bad key": {LABEL_KEY_NAME_PART}'),
        ({"-app": "v"}, f'metadata.labels: Invalid value: "-app": {LABEL_KEY_NAME_PART}'),
        (
            {"k" * 64: "v"},
            f'metadata.labels: Invalid value: "{"k" * 64}": name part must be no more than 63 characters',
        ),
        ({"/app": "v"}, 'metadata.labels: Invalid value: "/app": prefix part must be non-empty'),
        ({"app/": "v"}, 'metadata.labels: Invalid value: "app/": name part must be non-empty'),
        (
            {"Example.com/app": "v"},
            'metadata.labels: Invalid value: "Example.com/app": prefix part a lowercase RFC 1123 subdomain',
        ),
        (
            {f"{'p' * 254}/k": "v"},
            f'metadata.labels: Invalid value: "{"p" * 254}/k": prefix part {TOO_LONG_253}',
        ),
        (
            {"a/b/c": "v"},
            'metadata.labels: Invalid value: "a/b/c": a qualified name must consist of alphanumeric',
        ),
        ({"app": "bad value"}, f'metadata.labels: Invalid value: "bad value": {LABEL_VALUE}'),
        ({"app": "-web"}, f'metadata.labels: Invalid value: "-web": {LABEL_VALUE}'),
        (
            {"app": "v" * 64},
            f'metadata.labels: Invalid value: "{"v" * 64}": must be no more than 63 characters',
        ),
        ({"app": True}, "metadata.labels[app]: Invalid value: true: must be a string (quote it in YAML)"),
        ({"app": 8080}, "metadata.labels[app]: Invalid value: 8080: must be a string (quote it in YAML)"),
    ],
)
def test_invalid_labels_are_refused(labels: dict[str, Any], expected: str) -> None:
    errors = field_errors(pod(labels=labels))
    assert any(e.startswith(expected) for e in errors), errors


def test_labels_must_be_a_map() -> None:
    assert_refused(pod(labels=["app=web"]), 'metadata.labels: Invalid value: ["app=web"]: must be an object')


def test_annotation_keys_are_qualified_names_and_values_strings() -> None:
    admit(pod(annotations={"Example.com/Thing": "any text at all, even long " * 10}))
    errors = field_errors(pod(annotations={"bad key": "x", "ok": 1}))
    assert errors[0].startswith('metadata.annotations: Invalid value: "bad key": name part must consist')
    assert errors[1] == "metadata.annotations[ok]: Invalid value: 1: must be a string"


def test_annotations_have_a_size_limit() -> None:
    errors = field_errors(pod(annotations={"a": "x" * (256 * 1024)}))
    assert errors == ["metadata.annotations: Too long: must have at most 262144 bytes"]


# --- Namespace ----------------------------------------------------------------------------------------


def test_namespace_gets_its_name_label() -> None:
    out = admit(namespace("web", labels={"team": "blue"}))
    assert out["metadata"]["labels"] == {"team": "blue", "kubernetes.io/metadata.name": "web"}


def test_namespace_name_label_is_kept_correct() -> None:
    out = admit(namespace("web", labels={"kubernetes.io/metadata.name": "other"}))
    assert out["metadata"]["labels"]["kubernetes.io/metadata.name"] == "web"


def test_admission_does_not_change_its_input() -> None:
    obj = namespace("web")
    before = copy.deepcopy(obj)
    admit(obj)
    assert obj == before


def test_system_namespaces_are_valid_namespaces() -> None:
    names = [ns["metadata"]["name"] for ns in system_namespaces()]
    assert names == ["default", "kube-system", "kube-public", "kube-node-lease"]
    assert all(ns["metadata"]["labels"]["kubernetes.io/metadata.name"] for ns in system_namespaces())


@pytest.mark.parametrize("name", ["default", "kube-system", "kube-public", "kube-node-lease"])
def test_system_namespaces_cannot_be_deleted(name: str) -> None:
    with pytest.raises(AdmissionError) as info:
        check_delete(NAMESPACE, name)
    assert info.value.reason == "Forbidden"
    assert str(info.value) == f'namespaces "{name}" is forbidden: this namespace may not be deleted'
    check_delete(NAMESPACE, "web")
    check_delete(POD, name)


# --- Pod ----------------------------------------------------------------------------------------------


def test_pod_needs_containers() -> None:
    obj = pod()
    del obj["spec"]
    assert field_errors(obj) == ["spec.containers: Required value"]
    assert field_errors(pod([])) == ["spec.containers: Required value"]


def test_container_name_is_required_a_dns_label_and_unique() -> None:
    assert_refused(pod([{"image": "i"}]), "spec.containers[0].name: Required value")
    errors = field_errors(pod([{"name": "Main", "image": "i"}]))
    assert errors[0].startswith('spec.containers[0].name: Invalid value: "Main": a lowercase RFC 1123 label')
    assert_refused(
        pod([{"name": "a", "image": "i"}, {"name": "a", "image": "i"}]),
        'spec.containers[1].name: Duplicate value: "a"',
    )


def test_container_image_is_required() -> None:
    assert field_errors(pod([{"name": "main"}])) == ["spec.containers[0].image: Required value"]


C = "spec.containers[0].ports[0]"


def test_container_port_protocol_defaults_to_tcp() -> None:
    out = admit(pod_ports({"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}))
    assert [p["protocol"] for p in out["spec"]["containers"][0]["ports"]] == ["TCP", "UDP"]


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({}, "spec.containers[0].ports[0].containerPort: Required value"),
        ({"containerPort": 0}, "spec.containers[0].ports[0].containerPort: Required value"),
        (
            {"containerPort": 65536},
            f"{C}.containerPort: Invalid value: 65536: {RANGE}",
        ),
        (
            {"containerPort": -1},
            f"{C}.containerPort: Invalid value: -1: {RANGE}",
        ),
        (
            {"containerPort": "80"},
            'spec.containers[0].ports[0].containerPort: Invalid value: "80": must be an integer',
        ),
        (
            {"containerPort": 80, "protocol": "ICMP"},
            f'{C}.protocol: Unsupported value: "ICMP": {PROTOCOLS}',
        ),
        (
            {"containerPort": 80, "protocol": "tcp"},
            f'{C}.protocol: Unsupported value: "tcp": {PROTOCOLS}',
        ),
        (
            {"containerPort": 80, "hostPort": 70000},
            f"{C}.hostPort: Invalid value: 70000: {RANGE}",
        ),
    ],
)
def test_container_port_numbers_and_protocols(port: Obj, expected: str) -> None:
    assert_refused(pod_ports(port), expected)


def test_sctp_and_udp_container_ports_are_accepted() -> None:
    admit(pod_ports({"containerPort": 9, "protocol": "SCTP"}, {"containerPort": 9, "protocol": "UDP"}))


@pytest.mark.parametrize("name", ["http", "h2c", "web-8080", "a", "x" * 15, "1a"])
def test_valid_port_names(name: str) -> None:
    admit(pod_ports({"containerPort": 80, "name": name}))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x" * 16, "must be no more than 15 characters"),
        ("Http", "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"),
        ("web_1", "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"),
        ("8080", "must contain at least one letter (a-z)"),
        ("web--1", "must not contain consecutive hyphens"),
        ("-web", "must not begin or end with a hyphen"),
        ("web-", "must not begin or end with a hyphen"),
    ],
)
def test_invalid_port_names(name: str, reason: str) -> None:
    assert_refused(
        pod_ports({"containerPort": 80, "name": name}),
        f'spec.containers[0].ports[0].name: Invalid value: "{name}": {reason}',
    )


def test_port_names_are_unique_in_the_pod() -> None:
    assert_refused(
        pod_ports({"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "http"}),
        'spec.containers[0].ports[1].name: Duplicate value: "http"',
    )
    two = pod(
        [
            {"name": "a", "image": "i", "ports": [{"containerPort": 80, "name": "http"}]},
            {"name": "b", "image": "i", "ports": [{"containerPort": 8080, "name": "http"}]},
        ]
    )
    assert_refused(two, 'spec.containers[1].ports[0].name: Duplicate value: "http"')


# --- NetworkPolicy ------------------------------------------------------------------------------------


def test_pod_selector_is_required() -> None:
    assert field_errors(netpol({})) == [
        "spec.podSelector: Required value: may be {} to select every pod in the namespace"
    ]
    obj = netpol()
    del obj["spec"]
    assert field_errors(obj) == ["spec.podSelector: Required value: may be {} to select every pod in the namespace"]


def test_empty_and_null_pod_selectors_select_every_pod() -> None:
    assert admit(netpol({"podSelector": {}}))["spec"]["podSelector"] == {}
    assert admit(netpol({"podSelector": None}))["spec"]["podSelector"] == {}


def test_spec_must_be_an_object() -> None:
    assert_refused(netpol([]), "spec: Invalid value: []: must be an object")


def test_policy_types_default_to_ingress() -> None:
    assert admit(netpol({"podSelector": {}}))["spec"]["policyTypes"] == ["Ingress"]
    assert admit(netpol({"podSelector": {}, "ingress": [{}]}))["spec"]["policyTypes"] == ["Ingress"]


def test_policy_types_default_to_ingress_and_egress_with_egress_rules() -> None:
    assert admit(netpol({"podSelector": {}, "egress": [{}]}))["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_given_policy_types_are_kept() -> None:
    assert admit(netpol({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}))["spec"]["policyTypes"] == [
        "Egress"
    ]


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        (
            ["ingress"],
            'spec.policyTypes[0]: Unsupported value: "ingress": supported values: "Ingress", "Egress"',
        ),
        (
            ["Ingress", "Both"],
            'spec.policyTypes[1]: Unsupported value: "Both": supported values: "Ingress", "Egress"',
        ),
        (["Egress", "Egress"], 'spec.policyTypes[1]: Duplicate value: "Egress"'),
        (
            ["Ingress", "Egress", "Ingress"],
            'spec.policyTypes: Invalid value: ["Ingress", "Egress", "Ingress"]: '
            "may not specify more than two policyTypes",
        ),
        ("Ingress", 'spec.policyTypes: Invalid value: "Ingress": must be an array'),
    ],
)
def test_policy_types_are_ingress_or_egress_once(types: Any, expected: str) -> None:
    assert_refused(netpol({"podSelector": {}, "policyTypes": types}), expected)


def test_ports_default_to_tcp() -> None:
    out = admit(netpol({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}], "egress": [{"ports": [{}]}]}))
    assert out["spec"]["ingress"][0]["ports"] == [{"port": 80, "protocol": "TCP"}]
    assert out["spec"]["egress"][0]["ports"] == [{"protocol": "TCP"}]


@pytest.mark.parametrize(
    "port",
    [
        {"port": 80},
        {"port": 1},
        {"port": 65535},
        {"port": "http"},
        {"port": 8000, "endPort": 9000},
        {"port": 80, "endPort": 80},
        {"protocol": "UDP", "port": 53},
        {"protocol": "SCTP"},
        {},
    ],
)
def test_valid_policy_ports(port: Obj) -> None:
    admit(ingress_port(**port))


P = "spec.ingress[0].ports[0]"
ALPHANUMERIC = "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (
            {"protocol": "ICMP"},
            f'{P}.protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"',
        ),
        ({"port": 0}, f"{P}.port: Invalid value: 0: must be between 1 and 65535, inclusive"),
        ({"port": 65536}, f"{P}.port: Invalid value: 65536: must be between 1 and 65535, inclusive"),
        (
            {"port": "HTTP"},
            f'{P}.port: Invalid value: "HTTP": {ALPHANUMERIC}',
        ),
        ({"port": "80"}, f'{P}.port: Invalid value: "80": must contain at least one letter (a-z)'),
        (
            {"port": "a-very-long-port-name"},
            f'{P}.port: Invalid value: "a-very-long-port-name": must be no more than 15 characters',
        ),
        ({"port": True}, f"{P}.port: Invalid value: true: must be a port number or a port name"),
        ({"port": [80]}, f"{P}.port: Invalid value: [80]: must be a port number or a port name"),
        (
            {"port": 80, "endPort": 79},
            f"{P}.endPort: Invalid value: 79: must be greater than or equal to port",
        ),
        (
            {"port": 80, "endPort": 65536},
            f"{P}.endPort: Invalid value: 65536: must be between 1 and 65535, inclusive",
        ),
        (
            {"endPort": 90},
            f"{P}.endPort: Invalid value: 90: may not be specified when `port` is not specified",
        ),
        (
            {"port": "http", "endPort": 90},
            f"{P}.endPort: Invalid value: 90: may not be specified when `port` is non-numeric",
        ),
        ({"port": 80, "endPort": "90"}, f'{P}.endPort: Invalid value: "90": must be an integer'),
    ],
)
def test_invalid_policy_ports(port: Obj, expected: str) -> None:
    assert_refused(ingress_port(**port), expected)


def test_egress_ports_are_checked_too() -> None:
    obj = netpol({"podSelector": {}, "egress": [{"ports": [{"port": 80, "endPort": 1}]}]})
    assert_refused(obj, "spec.egress[0].ports[0].endPort: Invalid value: 1: must be greater than or equal to port")


@pytest.mark.parametrize(
    "peer",
    [
        {"podSelector": {}},
        {"namespaceSelector": {}},
        {"podSelector": {"matchLabels": {"app": "db"}}, "namespaceSelector": {"matchLabels": {"team": "a"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}},
        {"ipBlock": {"cidr": "10.0.0.1/8"}},  # host bits: Go's ParseCIDR, as the API server, takes it
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]}},
        {"ipBlock": {"cidr": "fd00::/48", "except": ["fd00::/64"]}},
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}},
    ],
)
def test_valid_peers(peer: Obj) -> None:
    admit(ingress_peer(**peer))
    admit(netpol({"podSelector": {}, "egress": [{"to": [peer]}]}))


F = "spec.ingress[0].from[0]"
NOT_A_CIDR = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ({}, f"{F}: Required value: must specify a peer"),
        ({"podSelector": None}, f"{F}: Required value: must specify a peer"),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
            f"{F}: Forbidden: may not specify both ipBlock and another peer",
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}},
            f"{F}: Forbidden: may not specify both ipBlock and another peer",
        ),
        ({"ipBlock": {}}, f"{F}.ipBlock.cidr: Required value"),
        ({"ipBlock": {"cidr": ""}}, f"{F}.ipBlock.cidr: Required value"),
        ({"ipBlock": {"cidr": "10.0.0.0"}}, f'{F}.ipBlock.cidr: Invalid value: "10.0.0.0": {NOT_A_CIDR}'),
        (
            {"ipBlock": {"cidr": "10.0.0.0/33"}},
            f'{F}.ipBlock.cidr: Invalid value: "10.0.0.0/33": {NOT_A_CIDR}',
        ),
        ({"ipBlock": {"cidr": "nope"}}, f'{F}.ipBlock.cidr: Invalid value: "nope": {NOT_A_CIDR}'),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["x"]}},
            f'{F}.ipBlock.except[0]: Invalid value: "x": {NOT_A_CIDR}',
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}},
            f'{F}.ipBlock.except[0]: Invalid value: "11.0.0.0/16": must be a strict subset of `cidr`',
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}},
            f'{F}.ipBlock.except[0]: Invalid value: "10.0.0.0/8": must be a strict subset of `cidr`',
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}},
            f'{F}.ipBlock.except[0]: Invalid value: "10.0.0.0/8": must be a strict subset of `cidr`',
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "fd00::/64"]}},
            f'{F}.ipBlock.except[1]: Invalid value: "fd00::/64": must be a strict subset of `cidr`',
        ),
        ({"ipBlock": "10.0.0.0/8"}, f'{F}.ipBlock: Invalid value: "10.0.0.0/8": must be an object'),
    ],
)
def test_invalid_peers(peer: Obj, expected: str) -> None:
    assert_refused(ingress_peer(**peer), expected)


def test_egress_peers_are_checked_too() -> None:
    assert_refused(
        netpol({"podSelector": {}, "egress": [{"to": [{}]}]}),
        "spec.egress[0].to[0]: Required value: must specify a peer",
    )


S = "spec.podSelector"
NEEDS_VALUES = "must be specified when `operator` is 'In' or 'NotIn'"
TAKES_NO_VALUES = "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"


@pytest.mark.parametrize(
    "selector",
    [
        {"matchLabels": {"app": "web", "example.com/tier": ""}},
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]},
        {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]},
        {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
        {"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": []}]},
    ],
)
def test_valid_selectors(selector: Obj) -> None:
    admit(netpol({"podSelector": selector}))
    admit(ingress_peer(namespaceSelector=selector))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (
            {"matchLabels": {"bad key": "v"}},
            f'{S}.matchLabels: Invalid value: "bad key": {LABEL_KEY_NAME_PART}',
        ),
        (
            {"matchLabels": {"app": "bad value"}},
            f'{S}.matchLabels: Invalid value: "bad value": {LABEL_VALUE}',
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In"}]},
            f"{S}.matchExpressions[0].values: Required value: {NEEDS_VALUES}",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": []}]},
            f"{S}.matchExpressions[0].values: Required value: {NEEDS_VALUES}",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]},
            f"{S}.matchExpressions[0].values: Forbidden: {TAKES_NO_VALUES}",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["a"]}]},
            f"{S}.matchExpressions[0].values: Forbidden: {TAKES_NO_VALUES}",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]},
            f'{S}.matchExpressions[0].operator: Invalid value: "Equals": not a valid selector operator',
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]},
            f'{S}.matchExpressions[0].operator: Invalid value: "in": not a valid selector operator',
        ),
        (
            {"matchExpressions": [{"key": "app"}]},
            f'{S}.matchExpressions[0].operator: Invalid value: "": not a valid selector operator',
        ),
        (
            {"matchExpressions": [{"key": "bad key", "operator": "Exists"}]},
            f'{S}.matchExpressions[0].key: Invalid value: "bad key": {LABEL_KEY_NAME_PART}',
        ),
        (
            {"matchExpressions": [{"operator": "Exists"}]},
            f'{S}.matchExpressions[0].key: Invalid value: "": name part must be non-empty',
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", "not ok"]}]},
            f'{S}.matchExpressions[0].values[1]: Invalid value: "not ok": {LABEL_VALUE}',
        ),
        (
            {"matchExpressions": {"key": "app"}},
            f'{S}.matchExpressions: Invalid value: {{"key": "app"}}: must be an array',
        ),
    ],
)
def test_invalid_selectors(selector: Obj, expected: str) -> None:
    assert_refused(netpol({"podSelector": selector}), expected)
    peer_expected = expected.replace(S, "spec.ingress[0].from[0].namespaceSelector")
    assert_refused(ingress_peer(namespaceSelector=selector), peer_expected)


# --- IPPool -------------------------------------------------------------------------------------------


def test_pool_block_size_is_written_down() -> None:
    assert admit(pool(cidr="10.0.0.0/16"))["spec"]["blockSize"] == 26
    assert admit(pool(cidr="fd00::/48"))["spec"]["blockSize"] == 122
    assert admit(pool(cidr="10.0.0.0/16", blockSize=24))["spec"]["blockSize"] == 24


@pytest.mark.parametrize(
    ("spec_cidr", "expected"),
    [
        (None, "spec.cidr: Required value"),
        ("", "spec.cidr: Required value"),
        ("nope", f'spec.cidr: Invalid value: "nope": {NOT_A_CIDR}'),
        ("10.0.0.0", f'spec.cidr: Invalid value: "10.0.0.0": {NOT_A_CIDR}'),
        (42, "spec.cidr: Invalid value: 42: must be a string"),
        ("10.0.0.1/16", 'spec.cidr: Invalid value: "10.0.0.1/16": must be a network in CIDR form'),
    ],
)
def test_pool_cidr_must_be_a_network(spec_cidr: Any, expected: str) -> None:
    errors = field_errors(pool(cidr=spec_cidr))
    assert any(e.startswith(expected) for e in errors), errors


def test_pool_spec_is_required() -> None:
    obj = pool()
    del obj["spec"]
    assert field_errors(obj) == ["spec: Required value"]


def test_pool_block_size_is_checked_by_the_pool_rules() -> None:
    assert field_errors(pool(cidr="10.0.0.0/16", blockSize=8)) == [
        "spec.blockSize: Invalid value: 8: must be from the pool's prefix length 16 to 30 for IPv4"
    ]
    assert field_errors(pool(cidr="10.0.0.0/16", blockSize="26"))[0].startswith('spec.blockSize: Invalid value: "26"')


def stored_pool(name: str, cidr: str, block_size: int | None = None) -> Obj:
    obj = pool(name, cidr)
    if block_size is not None:
        obj["spec"]["blockSize"] = block_size
    return obj


def test_pools_never_overlap_a_stored_pool() -> None:
    store = MemoryStore(stored_pool("a", "10.0.0.0/16"))
    assert field_errors(pool("b", "10.0.128.0/17"), store) == [
        'spec.cidr: Invalid value: "10.0.128.0/17": overlaps IPPool a (10.0.0.0/16)'
    ]
    assert field_errors(pool("b", "10.0.0.0/8"), store) == [
        'spec.cidr: Invalid value: "10.0.0.0/8": overlaps IPPool a (10.0.0.0/16)'
    ]
    admit(pool("b", "10.1.0.0/16"), store)
    admit(pool("v6", "fd00::/48"), store)


def test_pools_never_overlap_each_other_in_one_batch() -> None:
    with pytest.raises(AdmissionErrors) as info:
        admit_all([pool("a", "10.0.0.0/16"), pool("b", "10.1.0.0/16"), pool("c", "10.0.1.0/24")], MemoryStore())
    [(index, err)] = info.value.errors
    assert index == 2
    assert (
        str(err) == 'IPPool.tulle.dev "c" is invalid: '
        'spec.cidr: Invalid value: "10.0.1.0/24": overlaps IPPool a (10.0.0.0/16)'
    )


def test_a_pool_applied_again_does_not_overlap_itself() -> None:
    store = MemoryStore(stored_pool("a", "10.0.0.0/16", 26))
    admit(pool("a", "10.0.0.0/16"), store)
    admit(pool("a", "10.0.0.0/16", blockSize=26), store)


def test_a_pool_stored_without_block_size_takes_the_default_for_comparison() -> None:
    admit(pool("a", "10.0.0.0/16"), MemoryStore(stored_pool("a", "10.0.0.0/16")))


def test_a_pool_cidr_never_changes() -> None:
    store = MemoryStore(stored_pool("a", "10.0.0.0/16", 26))
    assert field_errors(pool("a", "10.1.0.0/16"), store) == [
        'spec.cidr: Invalid value: "10.1.0.0/16": field is immutable: addresses are handed out from 10.0.0.0/16'
    ]


def test_a_pool_block_size_never_changes() -> None:
    store = MemoryStore(stored_pool("a", "10.0.0.0/16", 26))
    assert field_errors(pool("a", "10.0.0.0/16", blockSize=24), store) == [
        "spec.blockSize: Invalid value: 24: field is immutable: blocks of /26 are claimed from this pool"
    ]


def test_pool_checks_against_the_store_need_a_store() -> None:
    admit(pool("b", "10.0.0.0/8"))  # no store: only the object itself is checked


# --- pod updates: what the API server lets an update change (ValidatePodUpdate) ----------------------


def stored_pod(**spec: Any) -> Obj:
    """A Pod as stored (defaulted), on node1, with a named port."""
    obj = pod([{"name": "main", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}])
    obj["metadata"].update(namespace="default", labels={"app": "web"})
    obj["spec"].update(nodeName="node1", **spec)
    return admit(obj)


def updated(current: Obj, change: Any) -> Obj:
    new = copy.deepcopy(current)
    change(new)
    return new


IMMUTABLE_POD_CHANGES = {
    "spec.nodeName": lambda p: p["spec"].update(nodeName="node2"),
    "spec.containers[0].ports[0].containerPort": lambda p: p["spec"]["containers"][0]["ports"][0].update(
        containerPort=8080
    ),
    "spec.containers[0].ports": lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 9}),
    "spec.containers[0].name": lambda p: p["spec"]["containers"][0].update(name="other"),
    "spec.hostNetwork": lambda p: p["spec"].update(hostNetwork=True),
    "spec.terminationGracePeriodSeconds": lambda p: p["spec"].update(terminationGracePeriodSeconds=5),
}


@pytest.mark.parametrize("path", sorted(IMMUTABLE_POD_CHANGES))
def test_a_pod_update_may_not_change_its_spec_and_names_the_field(path: str) -> None:
    current = stored_pod()
    errors = field_errors(updated(current, IMMUTABLE_POD_CHANGES[path]), MemoryStore(current))
    assert errors[0] == f"{path}: Forbidden: field is immutable"
    assert errors[-1].startswith(
        "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`"
    )


def test_a_refused_pod_update_is_one_message_naming_every_changed_field() -> None:
    current = stored_pod()
    change = updated(current, lambda p: p["spec"].update(nodeName="node2", hostNetwork=True))
    message = str(refused(change, MemoryStore(current)))
    assert message.startswith('Pod "p" is invalid: [spec.hostNetwork: Forbidden: field is immutable, ')
    assert "spec.nodeName: Forbidden: field is immutable" in message and "\n" not in message


ALLOWED_POD_CHANGES = {
    "labels": lambda p: p["metadata"].update(labels={"app": "db", "tier": "x"}),
    "annotations": lambda p: p["metadata"].update(annotations={"note": "x"}),
    "image": lambda p: p["spec"]["containers"][0].update(image="nginx"),
    "a deadline set": lambda p: p["spec"].update(activeDeadlineSeconds=30),
    "a toleration added": lambda p: p["spec"].update(tolerations=[{"key": "k", "operator": "Exists"}]),
    "nothing but explicit zero values": lambda p: p["spec"].update(hostNetwork=False, volumes=[], nodeSelector={}),
    "status": lambda p: p.update(status={"phase": "Running"}),
}


@pytest.mark.parametrize("what", sorted(ALLOWED_POD_CHANGES))
def test_a_pod_update_may_change_what_the_api_server_allows(what: str) -> None:
    current = stored_pod()
    admit(updated(current, ALLOWED_POD_CHANGES[what]), MemoryStore(current))


def test_pod_update_rules_for_deadlines_tolerations_gates_and_grace() -> None:
    with_deadline = stored_pod(activeDeadlineSeconds=30)
    store = MemoryStore(with_deadline)
    admit(updated(with_deadline, lambda p: p["spec"].update(activeDeadlineSeconds=10)), store)
    assert field_errors(updated(with_deadline, lambda p: p["spec"].update(activeDeadlineSeconds=60)), store) == [
        "spec.activeDeadlineSeconds: Invalid value: 60: must be less than or equal to previous value"
    ]
    assert field_errors(updated(with_deadline, lambda p: p["spec"].pop("activeDeadlineSeconds")), store) == [
        "spec.activeDeadlineSeconds: Invalid value: null: must not update from a positive integer to nil value"
    ]
    toleration = {"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute", "tolerationSeconds": 5}
    tolerant = stored_pod(tolerations=[toleration])
    store = MemoryStore(tolerant)
    admit(updated(tolerant, lambda p: p["spec"]["tolerations"][0].update(tolerationSeconds=50)), store)
    assert field_errors(updated(tolerant, lambda p: p["spec"]["tolerations"][0].update(value="w")), store) == [
        "spec.tolerations: Forbidden: existing toleration can not be modified except its tolerationSeconds"
    ]
    gated = stored_pod(schedulingGates=[{"name": "a"}, {"name": "b"}])
    store = MemoryStore(gated)
    admit(updated(gated, lambda p: p["spec"].update(schedulingGates=[{"name": "b"}])), store)
    assert field_errors(updated(gated, lambda p: p["spec"]["schedulingGates"].append({"name": "c"})), store) == [
        "spec.schedulingGates[2].name: Forbidden: only deletion is allowed, but found new scheduling gate 'c'"
    ]
    negative = stored_pod(terminationGracePeriodSeconds=-1)
    admit(updated(negative, lambda p: p["spec"].update(terminationGracePeriodSeconds=1)), MemoryStore(negative))


def test_a_pod_update_may_not_add_or_remove_containers() -> None:
    current = stored_pod()
    more = updated(current, lambda p: p["spec"]["containers"].append({"name": "side", "image": "busybox"}))
    assert field_errors(more, MemoryStore(current)) == [
        "spec.containers: Forbidden: pod updates may not add or remove containers"
    ]


def test_a_pod_stored_without_defaults_is_compared_as_the_api_server_stores_it() -> None:
    raw = pod([{"name": "main", "image": "busybox", "ports": [{"containerPort": 80}]}], namespace="default")
    admit(copy.deepcopy(raw), MemoryStore(raw))  # the stored port has no protocol; TCP is its default


def test_a_new_pod_is_not_an_update() -> None:
    admit(stored_pod(), MemoryStore())


# --- namespaces must exist ----------------------------------------------------------------------------


def test_an_object_in_a_missing_namespace_is_refused() -> None:
    err = refused(netpol(namespace="web"), MemoryStore())
    assert err.reason == "NotFound"
    assert str(err) == 'namespaces "web" not found'


def test_an_object_in_an_existing_namespace_is_admitted() -> None:
    admit(pod(namespace="web"), MemoryStore(namespace("web")))


def test_an_object_in_a_namespace_created_in_the_same_batch_is_admitted() -> None:
    out = admit_all([netpol(namespace="web"), namespace("web")], MemoryStore())
    assert [o["kind"] for o in out] == ["NetworkPolicy", "Namespace"]


@pytest.mark.parametrize("ns", ["default", "kube-system", "kube-public", "kube-node-lease"])
def test_system_namespaces_always_exist(ns: str) -> None:
    admit(netpol(namespace=ns), MemoryStore())


# --- batches ------------------------------------------------------------------------------------------


def test_a_batch_reports_every_refused_object_with_its_index() -> None:
    batch = [namespace("web"), netpol({}), pod(name="ok"), {"apiVersion": "v1", "kind": "Nope"}]
    with pytest.raises(AdmissionErrors) as info:
        admit_all(batch)
    assert [(i, e.reason) for i, e in info.value.errors] == [(1, "Invalid"), (3, "BadRequest")]


def test_a_valid_batch_comes_back_defaulted_in_order() -> None:
    out = admit_all([namespace("web"), netpol(namespace="web"), pool()], MemoryStore())
    assert [o["kind"] for o in out] == ["Namespace", "NetworkPolicy", "IPPool"]
    assert out[1]["spec"]["policyTypes"] == ["Ingress"]
