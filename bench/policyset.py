"""The policy set the benchmarks share (bench/policy.py, bench/idle.py): 1,000 NetworkPolicies
over 5,000 Pod objects in 50 namespaces, and how they are written into a lab's datastore."""

from __future__ import annotations

from typing import Any

from tulle.datastore.base import AtomicWriter, Datastore
from tulle.lab.cluster import Lab
from tulle.lab.state import load
from tulle.model.validation import admit_all

POLICIES = 1000
PODS = 5000
NAMESPACES = 50


def synthetic_objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """50 namespaces, 5,000 pods with addresses (outside the pools) and 1,000 policies.

    Policy i selects the 5 pods labelled app=svc-i in its namespace and admits, on TCP 80-81 and
    a named port, pods labelled tier=front from namespaces labelled team=t<i % 10>; every tenth
    policy also admits an ipBlock with an except.
    """
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{n}", "labels": {"team": f"t{n % 10}"}}}
        for n in range(NAMESPACES)
    ]
    pods = []
    for i in range(PODS):
        svc = i // 5
        ns = f"ns{svc % NAMESPACES}"
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"p{i}",
                    "namespace": ns,
                    "labels": {"app": f"svc-{svc}", "tier": "front" if i % 3 == 0 else "back"},
                },
                "spec": {
                    "nodeName": f"virtual{i % 20}",
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                        }
                    ],
                },
                "status": {"phase": "Running", "podIPs": [{"ip": f"10.250.{i // 250}.{i % 250 + 1}"}]},
            }
        )
    policies = []
    for i in range(POLICIES):
        peer: list[dict[str, Any]] = [
            {
                "namespaceSelector": {"matchLabels": {"team": f"t{i % 10}"}},
                "podSelector": {"matchLabels": {"tier": "front"}},
            }
        ]
        if i % 10 == 0:
            peer.append({"ipBlock": {"cidr": "192.168.0.0/16", "except": [f"192.168.{i % 256}.0/24"]}})
        policies.append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": f"pol-{i}", "namespace": f"ns{i % NAMESPACES}"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": f"svc-{i}"}},
                    "ingress": [
                        {
                            "from": peer,
                            "ports": [{"port": 80, "endPort": 81}, {"port": "http"}],
                        }
                    ],
                },
            }
        )
    return namespaces, pods, policies


def write_objects(lab: Lab, objects: list[dict[str, Any]]) -> None:
    """As `tulle apply` writes: admission of the whole, then atomic batches."""

    def apply(store: Datastore) -> None:
        assert isinstance(store, AtomicWriter), store.url
        store.apply_many(objects, admit=admit_all)

    lab.with_store(load(lab.name), apply)
