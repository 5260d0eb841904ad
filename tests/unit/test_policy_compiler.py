"""The NetworkPolicy compiler: Kubernetes semantics, atoms, stable ids, and the nft table it feeds.

The invariants of docs/design/policy.md are named in the tests that guard them (I1, I2, ...).
`reference_allowed` is Kubernetes NetworkPolicy written the plain way (selectors evaluated on
labels, no atoms); the property tests check the compiled model against it on random clusters.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tulle.model.selectors import matches
from tulle.policy.compiler import (
    EGRESS,
    INGRESS,
    LAST_ADDRESS,
    PolicyModel,
    cidr_intervals,
    compile_policies,
)
from tulle.policy.datapath import drop_counters, policy_chains, policy_table
from tulle.policy.inputs import (
    TYPE_EGRESS,
    TYPE_INGRESS,
    CidrPeer,
    PodPeer,
    PolicyInputs,
    inputs_from_objects,
)
from tulle.policy.verdict import decide, flow_allowed

Obj = dict[str, Any]
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1

# -- builders ------------------------------------------------------------------------------------


def namespace(name: str, **labels: str) -> Obj:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(
    ns: str,
    name: str,
    ips: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    ports: Sequence[tuple[str, int, str]] = (),
) -> Obj:
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels if labels is not None else {"pod": name},
        },
        "spec": {
            "nodeName": "n1",
            "containers": [
                {
                    "name": "main",
                    "ports": [{"name": n, "containerPort": p, "protocol": pr} for n, p, pr in ports],
                }
            ],
        },
        "status": {"podIPs": [{"ip": ip} for ip in ips]},
    }


def endpoint(ns: str, pod_name: str, ips: Sequence[str], node: str = "n1") -> Obj:
    return {
        "apiVersion": "tulle.dev/v1",
        "kind": "WorkloadEndpoint",
        "metadata": {"name": f"{pod_name}.1a2b3c4d", "namespace": ns},
        "spec": {"node": node, "pod": pod_name, "ifname": "eth0", "network": "tulle", "ips": list(ips)},
    }


def netpol(ns: str, name: str, **spec: Any) -> Obj:
    spec.setdefault("podSelector", {})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def build(
    namespaces: Iterable[Obj] = (),
    pods: Iterable[Obj] = (),
    policies: Iterable[Obj] = (),
    endpoints: Iterable[Obj] = (),
    previous: PolicyModel | None = None,
) -> PolicyModel:
    return compile_policies(
        inputs_from_objects(list(namespaces), list(pods), list(policies), list(endpoints)), previous
    )


def allowed(model: PolicyModel, src: str, dst: str, port: int | None = 80, protocol: int = TCP) -> bool:
    return flow_allowed(model, src, dst, protocol, port)


def labelled(key: str, value: str) -> dict[str, Any]:
    return {"matchLabels": {key: value}}


# A small cluster used by many tests: namespaces x (team=a) and y (team=b).
NAMESPACES = [namespace("x", team="a"), namespace("y", team="b")]
A = pod("x", "a", ["10.0.0.1", "fd00::1"], {"app": "a"})
B = pod("x", "b", ["10.0.0.2", "fd00::2"], {"app": "b"}, [("http", 8080, "TCP"), ("dns", 53, "UDP")])
C = pod("y", "c", ["10.0.0.3", "fd00::3"], {"app": "a"})
D = pod("y", "d", ["10.0.0.4", "fd00::4"], {"app": "b"}, [("http", 9090, "TCP")])
PODS = [A, B, C, D]


def cluster(*policies: Obj) -> PolicyModel:
    return build(NAMESPACES, PODS, policies)


# -- Kubernetes semantics ----------------------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    model = cluster()
    assert allowed(model, "10.0.0.1", "10.0.0.2")
    assert allowed(model, "192.0.2.1", "10.0.0.2", None, ICMP)


def test_default_deny_isolates_only_selected_pods() -> None:
    model = cluster(netpol("x", "deny", podSelector=labelled("app", "b")))
    assert not allowed(model, "10.0.0.1", "10.0.0.2")
    assert not allowed(model, "fd00::1", "fd00::2")
    assert allowed(model, "10.0.0.2", "10.0.0.1")  # egress of b is not isolated
    assert allowed(model, "10.0.0.1", "10.0.0.4")  # d is in another namespace


def test_isolation_is_decided_per_direction() -> None:
    """I5: a pod is isolated for ingress iff a policy selecting it has Ingress; likewise egress."""
    model = cluster(netpol("x", "out", podSelector=labelled("app", "b"), policyTypes=["Egress"]))
    assert model.pods["x/b"].egress == ("x/out",)
    assert model.pods["x/b"].ingress == ()
    assert allowed(model, "10.0.0.1", "10.0.0.2")
    assert not allowed(model, "10.0.0.2", "10.0.0.1")


def test_policy_types_default_ingress_only_without_egress_rules() -> None:
    # SetDefaults_NetworkPolicySpec: Ingress always, Egress only when len(spec.egress) != 0
    no_egress = cluster(netpol("x", "p", podSelector=labelled("app", "b")))
    assert no_egress.policies["x/p"].egress is None
    empty_egress = cluster(netpol("x", "p", podSelector=labelled("app", "b"), egress=[]))
    assert empty_egress.policies["x/p"].egress is None
    assert empty_egress.pods["x/b"].egress == ()
    with_egress = cluster(netpol("x", "p", podSelector=labelled("app", "b"), egress=[{}]))
    assert with_egress.policies["x/p"].ingress == ()
    assert with_egress.pods["x/b"].ingress == ("x/p",)
    assert with_egress.pods["x/b"].egress == ("x/p",)
    assert not allowed(with_egress, "10.0.0.1", "10.0.0.2")  # ingress: isolated, no rules
    assert allowed(with_egress, "10.0.0.2", "10.0.0.1")  # egress: the empty rule allows all


def test_rules_of_a_type_not_listed_are_ignored() -> None:
    model = cluster(netpol("x", "p", podSelector=labelled("app", "b"), policyTypes=["Egress"], ingress=[{}], egress=[]))
    assert model.policies["x/p"].ingress is None
    assert model.pods["x/b"].ingress == ()
    assert not allowed(model, "10.0.0.2", "10.0.0.1")


def test_empty_rule_allows_all_and_empty_rule_list_allows_nothing() -> None:
    open_ = cluster(netpol("x", "p", podSelector=labelled("app", "b"), ingress=[{}]))
    assert allowed(open_, "192.0.2.7", "10.0.0.2", 1234, UDP)
    assert allowed(open_, "2001:db8::1", "fd00::2", None, 58)
    closed = cluster(netpol("x", "p", podSelector=labelled("app", "b"), ingress=[]))
    assert not allowed(closed, "10.0.0.1", "10.0.0.2")


def test_empty_from_means_every_peer() -> None:
    model = cluster(netpol("x", "p", podSelector=labelled("app", "b"), ingress=[{"from": [], "ports": [{"port": 80}]}]))
    assert allowed(model, "192.0.2.7", "10.0.0.2", 80)
    assert not allowed(model, "192.0.2.7", "10.0.0.2", 81)


def test_pod_selector_alone_means_the_policys_own_namespace() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"podSelector": labelled("app", "a")}]}],
        )
    )
    assert allowed(model, "10.0.0.1", "10.0.0.2")  # x/a
    assert not allowed(model, "10.0.0.3", "10.0.0.2")  # y/c has app=a but lives in y


def test_empty_namespace_selector_means_all_namespaces() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"namespaceSelector": {}, "podSelector": labelled("app", "a")}]}],
        )
    )
    assert allowed(model, "10.0.0.1", "10.0.0.2")
    assert allowed(model, "10.0.0.3", "10.0.0.2")
    assert not allowed(model, "10.0.0.4", "10.0.0.2")
    assert not allowed(model, "192.0.2.1", "10.0.0.2")  # not a pod


def test_selectors_in_one_peer_are_anded_in_separate_peers_ored() -> None:
    anded = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"namespaceSelector": labelled("team", "b"), "podSelector": labelled("app", "a")}]}],
        )
    )
    assert allowed(anded, "10.0.0.3", "10.0.0.2")  # y/c: team=b and app=a
    assert not allowed(anded, "10.0.0.4", "10.0.0.2")  # y/d: app=b
    assert not allowed(anded, "10.0.0.1", "10.0.0.2")  # x/a: team=a
    ored = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[
                {
                    "from": [
                        {"namespaceSelector": labelled("team", "b")},
                        {"podSelector": labelled("app", "a")},
                    ]
                }
            ],
        )
    )
    assert allowed(ored, "10.0.0.3", "10.0.0.2")
    assert allowed(ored, "10.0.0.4", "10.0.0.2")
    assert allowed(ored, "10.0.0.1", "10.0.0.2")


def test_match_expressions_select_peers() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]
                            },
                            "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
                        }
                    ]
                }
            ],
        )
    )
    assert allowed(model, "10.0.0.3", "10.0.0.2")
    assert allowed(model, "10.0.0.4", "10.0.0.2")
    assert not allowed(model, "10.0.0.1", "10.0.0.2")


def test_namespace_selector_on_the_name_label() -> None:
    model = build(
        [namespace("x"), namespace("y")],
        PODS,
        [
            netpol(
                "x",
                "p",
                podSelector=labelled("app", "b"),
                ingress=[{"from": [{"namespaceSelector": labelled("kubernetes.io/metadata.name", "y")}]}],
            )
        ],
    )
    assert allowed(model, "10.0.0.3", "10.0.0.2")
    assert not allowed(model, "10.0.0.1", "10.0.0.2")


def test_ip_block_with_except() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25", "192.0.2.5/32"]}}]}],
        )
    )
    assert allowed(model, "192.0.2.4", "10.0.0.2")
    assert not allowed(model, "192.0.2.5", "10.0.0.2")
    assert allowed(model, "192.0.2.6", "10.0.0.2")
    assert not allowed(model, "192.0.2.200", "10.0.0.2")
    assert not allowed(model, "198.51.100.1", "10.0.0.2")


def test_ip_block_applies_to_pod_addresses_too() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.3/32"}}]}],
        )
    )
    assert allowed(model, "10.0.0.3", "10.0.0.2")
    assert not allowed(model, "10.0.0.1", "10.0.0.2")


def test_an_ip_block_says_nothing_about_the_other_family() -> None:
    """I6: an IPv4 ipBlock neither allows nor denies IPv6 traffic by itself, and vice versa."""
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[
                {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
                {"from": [{"ipBlock": {"cidr": "fd00::3/128"}}]},
            ],
        )
    )
    assert allowed(model, "203.0.113.9", "10.0.0.2")
    assert not allowed(model, "fd00::1", "fd00::2")
    assert allowed(model, "fd00::3", "fd00::2")
    assert model.policies["x/p"].ingress is not None
    rule0 = model.policies["x/p"].ingress[0]
    assert rule0.peers_v4 is None  # 0.0.0.0/0: every IPv4 address, no atom needed
    assert rule0.peers_v6 == frozenset()


def test_ports_numbers_ranges_protocols() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[
                {
                    "ports": [
                        {"port": 80},
                        {"protocol": "UDP", "port": 1000, "endPort": 2000},
                        {"protocol": "SCTP", "port": 9},
                        {"protocol": "UDP"},
                    ]
                }
            ],
        )
    )
    assert allowed(model, "10.0.0.1", "10.0.0.2", 80, TCP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 81, TCP)
    assert allowed(model, "10.0.0.1", "10.0.0.2", 1500, UDP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 1500, TCP)
    assert allowed(model, "10.0.0.1", "10.0.0.2", 2000, UDP)
    assert allowed(model, "10.0.0.1", "10.0.0.2", 9, SCTP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 9, TCP)
    assert allowed(model, "10.0.0.1", "10.0.0.2", 5, UDP)  # protocol without port: all its ports
    assert not allowed(model, "10.0.0.1", "10.0.0.2", None, ICMP)  # ports never match ICMP


def test_protocol_defaults_to_tcp() -> None:
    model = cluster(netpol("x", "p", podSelector=labelled("app", "b"), ingress=[{"ports": [{"port": 53}]}]))
    assert allowed(model, "10.0.0.1", "10.0.0.2", 53, TCP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 53, UDP)


def test_ingress_named_port_resolves_per_destination_pod_by_name_and_protocol() -> None:
    model = build(
        NAMESPACES,
        PODS,
        [netpol("x", "p", ingress=[{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}])],
    )
    assert allowed(model, "10.0.0.1", "10.0.0.2", 8080)  # x/b: http is 8080/TCP
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 80)
    assert allowed(model, "10.0.0.1", "10.0.0.2", 53, UDP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 53, TCP)  # dns is UDP only
    assert not allowed(model, "10.0.0.2", "10.0.0.1", 8080)  # x/a has no port named http


def test_named_port_with_a_different_protocol_does_not_match() -> None:
    model = build(NAMESPACES, PODS, [netpol("x", "p", ingress=[{"ports": [{"port": "dns"}]}])])  # TCP
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 53, TCP)
    assert not allowed(model, "10.0.0.1", "10.0.0.2", 53, UDP)


def test_egress_named_port_resolves_per_destination_pod() -> None:
    """I3: pods that differ in how they resolve an egress named port never share an atom."""
    e1 = pod("y", "e1", ["10.0.0.5"], {"app": "svc"}, [("http", 8080, "TCP")])
    e2 = pod("y", "e2", ["10.0.0.6"], {"app": "svc"}, [("http", 9090, "TCP")])
    e3 = pod("y", "e3", ["10.0.0.7"], {"app": "svc"})
    model = build(
        NAMESPACES,
        [A, e1, e2, e3],
        [
            netpol(
                "x",
                "p",
                podSelector=labelled("app", "a"),
                egress=[
                    {
                        "to": [{"namespaceSelector": {}, "podSelector": labelled("app", "svc")}],
                        "ports": [{"port": "http"}],
                    }
                ],
            )
        ],
    )
    assert allowed(model, "10.0.0.1", "10.0.0.5", 8080)
    assert not allowed(model, "10.0.0.1", "10.0.0.5", 9090)
    assert allowed(model, "10.0.0.1", "10.0.0.6", 9090)
    assert not allowed(model, "10.0.0.1", "10.0.0.6", 8080)
    assert not allowed(model, "10.0.0.1", "10.0.0.7", 8080)
    assert len({model.atom(a) for a in ("10.0.0.5", "10.0.0.6", "10.0.0.7")}) == 3


def test_egress_named_port_to_everyone_needs_a_destination_pod_with_the_port() -> None:
    model = build(
        NAMESPACES,
        PODS,
        [
            netpol(
                "x",
                "p",
                podSelector=labelled("app", "a"),
                egress=[{"ports": [{"port": "http"}, {"port": 443}]}],
            )
        ],
    )
    assert allowed(model, "10.0.0.1", "10.0.0.2", 8080)
    assert allowed(model, "10.0.0.1", "10.0.0.4", 9090)
    assert not allowed(model, "10.0.0.1", "10.0.0.4", 8080)
    assert not allowed(model, "10.0.0.1", "192.0.2.1", 8080)  # not a pod: no named ports
    assert allowed(model, "10.0.0.1", "192.0.2.1", 443)


def test_several_policies_are_a_union() -> None:
    model = cluster(
        netpol(
            "x",
            "p1",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"podSelector": labelled("app", "a")}]}],
        ),
        netpol(
            "x",
            "p2",
            podSelector={},
            ingress=[{"from": [{"namespaceSelector": labelled("team", "b")}], "ports": [{"port": 80}]}],
        ),
    )
    assert model.pods["x/b"].ingress == ("x/p1", "x/p2")
    assert allowed(model, "10.0.0.1", "10.0.0.2", 1)
    assert allowed(model, "10.0.0.4", "10.0.0.2", 80)
    assert not allowed(model, "10.0.0.4", "10.0.0.2", 81)
    assert not allowed(model, "10.0.0.4", "10.0.0.1", 81)
    assert allowed(model, "10.0.0.3", "10.0.0.1", 80)


def test_egress_and_ingress_both_apply() -> None:
    model = cluster(
        netpol(
            "x",
            "out",
            podSelector=labelled("app", "a"),
            policyTypes=["Egress"],
            egress=[{"ports": [{"port": 80}]}],
        ),
        netpol(
            "y",
            "in",
            podSelector={},
            ingress=[{"from": [{"namespaceSelector": {}}], "ports": [{"port": 443}]}],
        ),
    )
    assert not allowed(model, "10.0.0.1", "10.0.0.3", 80)  # egress yes, ingress no
    assert not allowed(model, "10.0.0.1", "10.0.0.3", 443)  # ingress yes, egress no
    assert allowed(model, "10.0.0.1", "10.0.0.2", 80)


def test_endpoint_without_pod_object_is_a_pod_without_labels() -> None:
    model = build(
        NAMESPACES,
        [A],
        [netpol("x", "p", podSelector={}, ingress=[{"from": [{"podSelector": {}}]}])],
        [endpoint("x", "ghost", ["10.0.0.9", "fd00::9"]), endpoint("z", "far", ["10.0.0.10"])],
    )
    assert model.pods["x/ghost"].addresses == ("10.0.0.9", "fd00::9")
    assert model.pods["x/ghost"].ingress == ("x/p",)
    assert allowed(model, "10.0.0.1", "10.0.0.9")
    assert allowed(model, "10.0.0.9", "10.0.0.1")
    assert not allowed(model, "10.0.0.10", "10.0.0.1")  # z/far: another namespace, implied by the endpoint


def test_addresses_are_the_union_of_endpoints_and_status() -> None:
    model = build(
        NAMESPACES,
        [pod("x", "a", ["10.0.0.1"], {"app": "a"})],
        [],
        [endpoint("x", "a", ["fd00::1", "10.0.0.1/32"])],
    )
    assert model.pods["x/a"].addresses == ("10.0.0.1", "fd00::1")
    assert model.pod_at("fd00:0::1") is not None


def test_host_network_and_finished_pods_have_no_policy_addresses() -> None:
    host = pod("x", "h", ["172.30.0.1"], {"app": "a"})
    host["spec"]["hostNetwork"] = True
    done = pod("x", "done", ["10.0.0.8"], {"app": "a"})
    done["status"]["phase"] = "Succeeded"
    model = build(NAMESPACES, [host, done])
    assert model.pod_at("172.30.0.1") is None
    assert model.pod_at("10.0.0.8") is None


def test_an_address_claimed_twice_is_reported() -> None:
    model = build(NAMESPACES, [A, pod("y", "twin", ["10.0.0.1"])])
    assert model.addresses["10.0.0.1"] == "x/a"
    assert any("10.0.0.1" in w and "y/twin" in w for w in model.warnings)


def test_malformed_objects_are_skipped_and_reported() -> None:
    """I10: malformed input is reported, never fatal, and a bad rule fails closed."""
    bad_rule = netpol(
        "x",
        "partly",
        podSelector=labelled("app", "b"),
        ingress=[
            {"from": [{"ipBlock": {"cidr": "nonsense"}}]},
            {"from": [{"podSelector": labelled("app", "a")}]},
        ],
    )
    model = build(
        [namespace("x"), "nope", {"metadata": {}}],
        [A, B, {"kind": "Pod", "metadata": {"name": "p", "namespace": "x", "labels": {"a": 1}}}],
        [
            bad_rule,
            netpol("x", "badsel", podSelector={"matchExpressions": [{"key": "a", "operator": "Is"}]}),
            netpol("x", "badtype", policyTypes=["Sideways"]),
            netpol("x", "badport", podSelector=labelled("app", "a"), ingress=[{"ports": [{"port": 70000}]}]),
            netpol("x", "badpeer", podSelector=labelled("app", "a"), egress=[{"to": [{}]}]),
        ],
        [{"kind": "WorkloadEndpoint", "metadata": {"name": "w", "namespace": "x"}, "spec": {"ips": ["x"]}}],
    )
    text = "\n".join(model.warnings)
    for fragment in ("nonsense", "badsel", "Sideways", "70000", "badpeer", "WorkloadEndpoint x/w", "labels"):
        assert fragment in text
    # A bad rule is dropped, the policy still isolates (fails closed); its index stays as written.
    assert model.policies["x/partly"].ingress is not None
    assert [r.index for r in model.policies["x/partly"].ingress] == [1]
    assert decide(model, INGRESS, "10.0.0.1", "10.0.0.2", TCP, 80).allowed
    assert not allowed(model, "192.0.2.1", "10.0.0.2")
    assert not allowed(model, "10.0.0.1", "192.0.2.1")  # x/a: egress isolated by badpeer, whose rule is gone
    # A policy whose selector cannot be read is ignored altogether.
    assert "x/badsel" not in model.policies
    # A rule with bad ports allows nothing; the pod stays isolated.
    assert not allowed(model, "10.0.0.2", "10.0.0.1", 80)


def test_a_bad_port_or_address_does_not_cost_a_pod_its_labels() -> None:
    """Fail closed: a pod whose labels are readable stays selected, so it stays isolated."""
    odd = pod("x", "odd", ["10.0.0.7", "not-an-ip"], {"app": "b"}, [("http", 8080, "TCP"), ("bad", 0, "TCP")])
    odd["spec"]["containers"].append({"name": "side", "ports": [{"name": "x", "containerPort": 1, "protocol": "ICMP"}]})
    model = build(NAMESPACES, [odd], [netpol("x", "deny", podSelector=labelled("app", "b"))])
    assert model.pods["x/odd"].ingress == ("x/deny",)
    assert model.pods["x/odd"].addresses == ("10.0.0.7",)
    assert model.pods["x/odd"].named_ports == frozenset({("http", TCP, 8080)})
    text = "\n".join(model.warnings)
    assert "not-an-ip" in text and "containerPort" in text and "ICMP" in text


GARBAGE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def _mangle(obj: Any, path: list[str], value: Any) -> Any:
    import copy

    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else target
        if not isinstance(target, dict):
            return out
    if isinstance(target, dict):
        target[path[-1]] = value
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    garbage=GARBAGE,
    where=st.sampled_from(
        [
            ["spec", "podSelector"],
            ["spec", "ingress"],
            ["spec", "egress"],
            ["spec", "policyTypes"],
            ["metadata", "name"],
            ["spec", "ingress", "0"],
            ["metadata"],
        ]
    ),
    kind=st.sampled_from(["policy", "pod", "namespace", "endpoint"]),
)
def test_never_crashes_on_malformed_objects(garbage: Any, where: list[str], kind: str) -> None:
    objs: dict[str, list[Any]] = {
        "namespace": list(NAMESPACES),
        "pod": list(PODS),
        "policy": [netpol("x", "p", ingress=[{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}])],
        "endpoint": [endpoint("x", "a", ["10.0.0.1"])],
    }
    objs[kind].append(_mangle(objs[kind][0], where, garbage))
    objs[kind].append(garbage)
    model = compile_policies(inputs_from_objects(objs["namespace"], objs["pod"], objs["policy"], objs["endpoint"]))
    policy_table(model, ["10.0.0.1", "10.0.0.2"])


# -- atoms ---------------------------------------------------------------------------------------------


def _check_partition(model: PolicyModel) -> None:
    for family in (4, 6):
        table = model.atom_table(family)
        pieces = list(table.intervals())
        assert pieces[0][0] == 0
        assert pieces[-1][1] == LAST_ADDRESS[family]
        for (_, last, atom), (first, _, next_atom) in itertools.pairwise(pieces):
            assert first == last + 1  # disjoint and no gap
            assert atom != next_atom  # merged where equal
        assert all(first <= last for first, last, _ in pieces)


def test_atoms_partition_the_space() -> None:
    """I1: each family's atom map is disjoint intervals covering the whole address space."""
    _check_partition(cluster())
    _check_partition(
        cluster(
            netpol(
                "x",
                "p",
                ingress=[
                    {"from": [{"ipBlock": {"cidr": "0.0.0.0/1", "except": ["10.0.0.0/30"]}}]},
                    {"from": [{"ipBlock": {"cidr": "::/0", "except": ["fd00::/127"]}}]},
                    {"from": [{"podSelector": labelled("app", "a")}]},
                ],
            )
        )
    )


def test_pods_with_the_same_signature_share_an_atom() -> None:
    pods = [
        pod("x", f"w{i}", [f"10.1.{i // 250}.{i % 250 + 1}"], {"app": "web" if i % 2 else "db"}) for i in range(1000)
    ]
    model = build(
        NAMESPACES,
        pods,
        [netpol("x", "p", ingress=[{"from": [{"podSelector": labelled("app", "web")}]}])],
    )
    atoms = {model.atom(p["status"]["podIPs"][0]["ip"]) for p in pods}
    assert len(atoms) == 2
    assert 0 in atoms  # db pods match no predicate
    assert len(model.signatures) == 2


def test_atom_ids_are_stable_across_recompiles() -> None:
    """I4: recompiling with the previous model keeps the ids of signatures that still exist."""
    policies = [
        netpol("x", "p", ingress=[{"from": [{"podSelector": labelled("app", "a")}]}]),
        netpol("y", "q", ingress=[{"from": [{"namespaceSelector": labelled("team", "a")}]}]),
    ]
    first = cluster(*policies)
    again = build(NAMESPACES, PODS, list(reversed(policies)), previous=first)
    assert again.signatures == first.signatures
    assert again.atoms_v4 == first.atoms_v4
    # A new pod with existing labels: its atom exists already; every other interval is unchanged.
    grown = build(NAMESPACES, [*PODS, pod("x", "a2", ["10.0.0.50"], {"app": "a"})], policies, previous=first)
    assert grown.atom("10.0.0.50") == first.atom("10.0.0.1")
    assert all(grown.atom(a) == first.atom(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"))


def test_a_new_signature_takes_over_the_id_its_addresses_had() -> None:
    base = [netpol("x", "p", ingress=[{"from": [{"podSelector": labelled("app", "a")}]}])]
    first = cluster(*base)
    # A new policy whose peer selects exactly x/a: x/a's signature changes, its atom id does not.
    more = [
        *base,
        netpol(
            "x",
            "q",
            ingress=[
                {
                    "from": [
                        {
                            "podSelector": {"matchLabels": {"app": "a"}},
                            "namespaceSelector": labelled("team", "a"),
                        }
                    ]
                }
            ],
        ),
    ]
    second = cluster(*more)
    stable = build(NAMESPACES, PODS, more, previous=first)
    assert stable.atoms_v4 == first.atoms_v4
    assert stable.atoms_v6 == first.atoms_v6
    assert second.atom("10.0.0.1") != 0


def test_a_label_change_moves_one_address() -> None:
    policies = [netpol("x", "p", ingress=[{"from": [{"namespaceSelector": {}, "podSelector": labelled("app", "a")}]}])]
    first = cluster(*policies)
    moved = build(NAMESPACES, [A, B, pod("y", "c", ["10.0.0.3", "fd00::3"], {"app": "z"}), D], policies, previous=first)
    assert moved.atom("10.0.0.1") == first.atom("10.0.0.1")
    assert moved.atom("10.0.0.3") == 0 != first.atom("10.0.0.3")


def test_cidr_intervals_subtract_excepts() -> None:
    peer = CidrPeer("10.0.0.0/24", ("10.0.0.0/25", "10.0.0.200/32"))
    got = [(str(ipaddress.ip_address(a)), str(ipaddress.ip_address(b))) for a, b in cidr_intervals(peer)]
    assert got == [("10.0.0.128", "10.0.0.199"), ("10.0.0.201", "10.0.0.255")]


# -- the nft table ------------------------------------------------------------------------------------


def _interval_sets_are_disjoint(model: PolicyModel, local: list[str]) -> None:
    table = policy_table(model, local)
    for s in table.sets.values():
        if not s.interval:
            continue
        keys = [e[0] if s.map else e for e in s.elements]
        by_prefix: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for key in keys:
            *prefix, last = key
            by_prefix.setdefault(tuple(prefix), []).append(last if isinstance(last, tuple) else (last, last))
        for ranges in by_prefix.values():
            ordered = sorted(ranges)
            for (_, hi), (lo, _) in itertools.pairwise(ordered):
                assert lo > hi, f"{s.name}: overlapping elements {ordered}"


def test_policy_table_shape() -> None:
    model = cluster(
        netpol(
            "x",
            "p",
            podSelector=labelled("app", "b"),
            ingress=[
                {
                    "from": [{"podSelector": labelled("app", "a")}],
                    "ports": [{"port": 80}, {"port": 70, "endPort": 90}],
                }
            ],
        ),
        netpol(
            "x",
            "q",
            podSelector=labelled("app", "b"),
            ingress=[{"from": [{"podSelector": labelled("app", "a")}], "ports": [{"port": 85, "endPort": 100}]}],
        ),
    )
    table = policy_table(model, ["10.0.0.1", "10.0.0.2", "fd00::2", "198.51.100.1"])
    assert table.chains == policy_chains()
    assert table.chains["forward"].hook == ("filter", "forward", 0, "accept")
    assert table.chains["input"].hook == ("filter", "input", 0, "accept")
    for base in ("forward", "input"):
        assert table.chains[base].rules[0] == (
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": None},
        )
    # x/a is not isolated: no element mentions it.
    a = int(ipaddress.ip_address("10.0.0.1"))
    assert (a,) not in {e[0] for e in table.sets["ingress_endpoints_v4"].elements}
    b = int(ipaddress.ip_address("10.0.0.2"))
    assert table.sets["ingress_endpoints_v4"].elements == {((b,), ("jump", "ingress_isolated_v4"))}
    atom_a = model.atom("10.0.0.1")
    # 70-90 and 85-100 and 80 merge into one element: nft refuses overlapping intervals.
    marks = (atom_a, atom_a)
    assert table.sets["ingress_peer_ports_v4"].elements == {((b, b), marks, (TCP, TCP), (70, 100))}
    assert drop_counters(model, ["10.0.0.1", "10.0.0.2", "fd00::2"]) == {
        "drop_ingress_v4_10_0_0_2": ("x/b", INGRESS),
        "drop_ingress_v6_fd00__2": ("x/b", INGRESS),
    }
    assert table.counters == set(drop_counters(model, ["10.0.0.2", "fd00::2"]))
    assert not {"postrouting", "pools_v4", "pools_v6"} & (set(table.chains) | set(table.sets))
    _interval_sets_are_disjoint(model, ["10.0.0.2", "fd00::2"])


def test_open_endpoint_needs_no_other_element() -> None:
    model = cluster(netpol("x", "p", podSelector=labelled("app", "b"), ingress=[{"ports": [{"port": 80}]}, {}]))
    table = policy_table(model, ["10.0.0.2"])
    assert table.sets["ingress_open_v4"].elements == {(int(ipaddress.ip_address("10.0.0.2")),)}
    assert not table.sets["ingress_anyone_v4"].elements


def _big_cluster(n_pods: int, n_policies: int, namespaces: int = 50) -> tuple[list[Obj], list[Obj], list[Obj]]:
    nss = [namespace(f"ns{i}", team=f"t{i % 7}", env="prod" if i % 3 else "dev") for i in range(namespaces)]
    pods = []
    for i in range(n_pods):
        ns = f"ns{i % namespaces}"
        ip4 = str(ipaddress.ip_address("10.64.0.0") + i + 1)
        ip6 = str(ipaddress.ip_address("fd00:64::") + i + 1)
        labels = {"app": f"app{i % 40}", "tier": ("web", "api", "db")[i % 3], "pod": f"p{i}"}
        ports = [("http", 8080 + i % 2, "TCP"), ("metrics", 9100, "TCP")]
        pods.append(pod(ns, f"p{i}", [ip4, ip6], labels, ports))
    policies = []
    for j in range(n_policies):
        ns = f"ns{j % namespaces}"
        ingress = [
            {
                "from": [
                    {"podSelector": labelled("app", f"app{(j + 1) % 40}")},
                    {
                        "namespaceSelector": labelled("team", f"t{j % 7}"),
                        "podSelector": labelled("tier", "web"),
                    },
                    {
                        "ipBlock": {
                            "cidr": f"172.{16 + j % 16}.0.0/16",
                            "except": [f"172.{16 + j % 16}.{j % 256}.0/24"],
                        }
                    },
                ],
                "ports": [
                    {"port": 80},
                    {"port": "http"},
                    {"protocol": "UDP", "port": 5000, "endPort": 5100 + j % 50},
                ],
            }
        ]
        egress = [
            {
                "to": [
                    {"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}}
                ],
                "ports": [{"port": "metrics"}],
            },
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]},
        ]
        spec: dict[str, Any] = {"podSelector": labelled("app", f"app{j % 40}"), "ingress": ingress}
        if j % 2:
            spec["egress"] = egress
        policies.append(netpol(ns, f"pol{j}", **spec))
    return nss, pods, policies


def test_rule_count_stays_flat_as_pods_and_policies_grow() -> None:
    """I2: the chains never depend on pods, namespaces or policies; only elements do."""
    empty = policy_table(cluster(), [])
    nss, pods, policies = _big_cluster(1000, 100, namespaces=20)
    model = build(nss, pods, policies)
    local = [ip["ip"] for p in pods[:100] for ip in p["status"]["podIPs"]]
    big = policy_table(model, local)
    assert big.rule_count() == empty.rule_count() == 37
    assert big.chains == empty.chains
    assert sum(len(s.elements) for s in big.sets.values()) > 1000
    _interval_sets_are_disjoint(model, local)


def test_compile_time_at_scale(capsys: pytest.CaptureFixture[str]) -> None:
    """Measures, never asserts: compile 1,000 policies over 5,000 pods, and one node's table."""
    nss, pods, policies = _big_cluster(5000, 1000)
    started = time.perf_counter()
    inputs = inputs_from_objects(nss, pods, policies, [])
    parsed = time.perf_counter()
    model = compile_policies(inputs)
    compiled = time.perf_counter()
    again = compile_policies(inputs, model)
    recompiled = time.perf_counter()
    local = [ip["ip"] for p in pods[:110] for ip in p["status"]["podIPs"]]
    table = policy_table(model, local)
    rendered = time.perf_counter()
    elements = sum(len(s.elements) for s in table.sets.values())
    with capsys.disabled():
        print(
            f"\n[policy scale] 5000 pods, 1000 policies: parse {parsed - started:.2f}s, "
            f"compile {compiled - parsed:.2f}s, recompile {recompiled - compiled:.2f}s, "
            f"atoms {len(model.signatures)}, table for 110 local pods {rendered - recompiled:.2f}s "
            f"({elements} elements, {table.rule_count()} rules)"
        )
    assert again.signatures == model.signatures


# -- property: the compiled model means what Kubernetes says --------------------------------------------

LABEL_VALUES = st.sampled_from(["a", "b", "c"])
POD_LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), LABEL_VALUES, max_size=2)


@st.composite
def selectors(draw: st.DrawFn, keys: Sequence[str] = ("app", "tier")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["matchLabels"] = draw(st.dictionaries(st.sampled_from(keys), LABEL_VALUES, max_size=1))
    exprs = []
    for _ in range(draw(st.integers(0, 1))):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        expr: dict[str, Any] = {"key": draw(st.sampled_from(keys)), "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(st.lists(LABEL_VALUES, min_size=1, max_size=2))
        exprs.append(expr)
    if exprs:
        out["matchExpressions"] = exprs
    return out


CIDRS = {
    "10.0.0.0/29": ["10.0.0.2/31", "10.0.0.4/32"],
    "10.0.0.0/24": ["10.0.0.0/30"],
    "0.0.0.0/0": ["10.0.0.0/29"],
    "192.0.2.0/24": [],
    "fd00::/125": ["fd00::2/127"],
    "::/0": [],
}


@st.composite
def peers(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
    if kind == "ip":
        cidr = draw(st.sampled_from(sorted(CIDRS)))
        block: dict[str, Any] = {"cidr": cidr}
        excepts = draw(st.lists(st.sampled_from(CIDRS[cidr]), max_size=2, unique=True)) if CIDRS[cidr] else []
        if excepts:
            block["except"] = excepts
        return {"ipBlock": block}
    out: dict[str, Any] = {}
    if kind in ("pod", "both"):
        out["podSelector"] = draw(selectors())
    if kind in ("ns", "both"):
        out["namespaceSelector"] = draw(selectors(("team", "kubernetes.io/metadata.name")))
    return out


@st.composite
def ports(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["protocol"] = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    choice = draw(st.sampled_from(["none", "num", "range", "name"]))
    if choice == "num":
        out["port"] = draw(st.sampled_from([53, 80, 8080]))
    elif choice == "range":
        out["port"] = 79
        out["endPort"] = draw(st.sampled_from([79, 81, 9000]))
    elif choice == "name":
        out["port"] = draw(st.sampled_from(["http", "dns"]))
    return out


@st.composite
def rules(draw: st.DrawFn, peer_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out[peer_field] = draw(st.lists(peers(), max_size=2))
    if draw(st.booleans()):
        out["ports"] = draw(st.lists(ports(), max_size=2))
    return out


NAMED_PORTS = [
    ("http", 80, "TCP"),
    ("http", 8080, "TCP"),
    ("dns", 53, "UDP"),
    ("http", 53, "UDP"),
    ("dns", 53, "TCP"),
]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Obj], list[Obj], list[Obj], list[Obj]]:
    nss = [namespace(n, **({"team": draw(LABEL_VALUES)} if draw(st.booleans()) else {})) for n in ("x", "y")]
    pods, endpoints = [], []
    for i in range(draw(st.integers(1, 6))):
        ns = draw(st.sampled_from(["x", "y"]))
        ips = [f"10.0.0.{i + 1}"] + ([f"fd00::{i + 1}"] if draw(st.booleans()) else [])
        if draw(st.integers(0, 5)) == 0:
            endpoints.append(endpoint(ns, f"p{i}", ips))
            continue
        named = draw(st.lists(st.sampled_from(NAMED_PORTS), max_size=2, unique_by=lambda p: (p[0], p[2])))
        pods.append(pod(ns, f"p{i}", ips, draw(POD_LABELS), named))
    policies = []
    for j in range(draw(st.integers(0, 4))):
        spec: dict[str, Any] = {"podSelector": draw(selectors())}
        types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
        if types:
            spec["policyTypes"] = types
        if draw(st.booleans()):
            spec["ingress"] = draw(st.lists(rules("from"), max_size=2))
        if draw(st.booleans()):
            spec["egress"] = draw(st.lists(rules("to"), max_size=2))
        policies.append(netpol(draw(st.sampled_from(["x", "y"])), f"pol{j}", **spec))
    return nss, pods, policies, endpoints


def reference_allowed(inputs: PolicyInputs, src: str, dst: str, protocol: int, port: int | None) -> bool:
    """Kubernetes NetworkPolicy, evaluated directly on labels for one flow."""
    flow = _ReferenceFlow(inputs, src, dst, protocol, port)
    return flow.direction_allows(EGRESS) and flow.direction_allows(INGRESS)


class _ReferenceFlow:
    """One flow judged the plain way: every policy, rule and peer looked at, no atoms."""

    def __init__(self, inputs: PolicyInputs, src: str, dst: str, protocol: int, port: int | None) -> None:
        self.inputs = inputs
        self.src, self.dst, self.protocol, self.port = src, dst, protocol, port
        self.family = ipaddress.ip_address(dst).version
        self.by_address: dict[str, Any] = {}
        for p in inputs.pods:
            for a in p.addresses:
                self.by_address.setdefault(a, p)
        self.ns_labels = {ns.name: dict(ns.labels) for ns in inputs.namespaces}

    def direction_allows(self, direction: str) -> bool:
        me = self.by_address.get(self.dst if direction == INGRESS else self.src)
        if me is None:
            return True  # not a pod: nothing isolates it
        selecting = self.selecting(me, TYPE_INGRESS if direction == INGRESS else TYPE_EGRESS)
        if not selecting:
            return True
        peer_address = self.src if direction == INGRESS else self.dst
        return any(
            self.rule_allows(rule, peer_address, pol.namespace)
            for pol in selecting
            for rule in (pol.ingress if direction == INGRESS else pol.egress)
        )

    def selecting(self, me: Any, policy_type: str) -> list[Any]:
        return [
            pol
            for pol in self.inputs.policies
            if policy_type in pol.types and pol.namespace == me.namespace and matches(pol.pod_selector, dict(me.labels))
        ]

    def rule_allows(self, rule: Any, peer_address: str, policy_ns: str) -> bool:
        if rule.peers:
            # An ipBlock of the other family says nothing about this flow.
            peers = [p for p in rule.peers if not isinstance(p, CidrPeer) or p.family == self.family]
            if not any(self.peer_holds(p, peer_address, policy_ns) for p in peers):
                return False
        return self.ports_allow(rule.ports, self.by_address.get(self.dst))

    def peer_holds(self, peer: Any, address: str, policy_ns: str) -> bool:
        if isinstance(peer, CidrPeer):
            ip = ipaddress.ip_address(address)
            if ip.version != peer.family or ip not in ipaddress.ip_network(peer.cidr):
                return False
            return not any(ip in ipaddress.ip_network(e) for e in peer.excepts)
        assert isinstance(peer, PodPeer)
        other = self.by_address.get(address)
        if other is None:
            return False
        if peer.namespace_selector is None:
            in_scope = other.namespace == policy_ns
        else:
            in_scope = matches(peer.namespace_selector, self.ns_labels[other.namespace])
        return in_scope and matches(peer.pod_selector, dict(other.labels))

    def ports_allow(self, entries: Any, dst_pod: Any) -> bool:
        if not entries:
            return True
        if self.port is None or self.protocol not in (TCP, UDP, SCTP):
            return False  # a rule with ports never allows a protocol without them
        return any(self.port_entry_allows(e, dst_pod, self.port) for e in entries if e.protocol == self.protocol)

    def port_entry_allows(self, entry: Any, dst_pod: Any, port: int) -> bool:
        if entry.name:
            named = dst_pod.named_ports if dst_pod is not None else ()
            return any(n.name == entry.name and n.protocol == self.protocol and n.port == port for n in named)
        return bool(entry.port is None or entry.port <= port <= (entry.end_port or entry.port))


EXTERNAL = ["192.0.2.9", "10.0.0.200", "10.0.0.4", "8.8.8.8", "fd00::200", "2001:db8::1"]
FLOWS = [(TCP, 80), (TCP, 8080), (TCP, 53), (UDP, 53), (SCTP, 80), (UDP, 79), (ICMP, None), (TCP, 9000)]


def all_addresses(model: PolicyModel) -> list[str]:
    return sorted(set(model.addresses) | set(EXTERNAL))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=clusters())
def test_compiled_model_agrees_with_kubernetes_semantics(
    world: tuple[list[Obj], list[Obj], list[Obj], list[Obj]],
) -> None:
    nss, pods, policies, endpoints = world
    inputs = inputs_from_objects(nss, pods, policies, endpoints)
    assert not inputs.warnings
    model = compile_policies(inputs)
    _check_partition(model)
    addresses = all_addresses(model)
    for src in addresses:
        for dst in addresses:
            if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
                continue
            for protocol, port in FLOWS:
                expected = reference_allowed(inputs, src, dst, protocol, port)
                got = flow_allowed(model, src, dst, protocol, port)
                assert got == expected, (
                    src,
                    dst,
                    protocol,
                    port,
                    decide(model, INGRESS, src, dst, protocol, port),
                )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=clusters(), other=clusters())
def test_recompiling_from_any_previous_model_means_the_same(
    world: tuple[list[Obj], list[Obj], list[Obj], list[Obj]],
    other: tuple[list[Obj], list[Obj], list[Obj], list[Obj]],
) -> None:
    """I4: atom ids are labels; any previous model gives a model with the same verdicts."""
    fresh = compile_policies(inputs_from_objects(*world))
    previous = compile_policies(inputs_from_objects(*other))
    reused = compile_policies(inputs_from_objects(*world), previous)
    _check_partition(reused)
    assert len(set(reused.signatures.values())) == len(reused.signatures)  # ids are unique
    for src in all_addresses(fresh):
        for dst in all_addresses(fresh):
            if ipaddress.ip_address(src).version == ipaddress.ip_address(dst).version:
                for protocol, port in FLOWS[:4]:
                    assert flow_allowed(fresh, src, dst, protocol, port) == flow_allowed(
                        reused, src, dst, protocol, port
                    )
