"""The resource kinds Tulle stores, with kubectl's names for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

Obj = dict[str, Any]  # a Kubernetes-shaped object: apiVersion, kind, metadata, spec, status


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    plural: str
    singular: str
    short: tuple[str, ...]
    namespaced: bool

    def names(self) -> tuple[str, ...]:
        return (self.kind.lower(), self.singular, self.plural, *self.short)


NAMESPACE = Kind("Namespace", "v1", "namespaces", "namespace", ("ns",), False)
POD = Kind("Pod", "v1", "pods", "pod", ("po",), True)
NODE = Kind("Node", "v1", "nodes", "node", ("no",), False)
NETWORK_POLICY = Kind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", "networkpolicy", ("netpol",), True)
IP_POOL = Kind("IPPool", "tulle.dev/v1", "ippools", "ippool", ("pool",), False)
WORKLOAD_ENDPOINT = Kind("WorkloadEndpoint", "tulle.dev/v1", "workloadendpoints", "workloadendpoint", ("wep",), True)
# A node's share of a pool and the addresses given from it (as Calico's IPAMBlock).
IPAM_BLOCK = Kind("IPAMBlock", "tulle.dev/v1", "ipamblocks", "ipamblock", ("block",), False)

KINDS: tuple[Kind, ...] = (NAMESPACE, POD, NODE, NETWORK_POLICY, IP_POOL, WORKLOAD_ENDPOINT, IPAM_BLOCK)
_BY_NAME = {name: kind for kind in KINDS for name in kind.names()}
_BY_KIND = {kind.kind: kind for kind in KINDS}


class UnknownKind(ValueError):
    pass


def lookup(name: str) -> Kind:
    """A kind by any of kubectl's names for it: `netpol`, `networkpolicy`, `NetworkPolicies`...

    >>> lookup("netpol").kind
    'NetworkPolicy'
    """
    found = _BY_NAME.get(name.lower()) or _BY_NAME.get(name.lower().split(".")[0])
    if found is None:
        known = ", ".join(sorted(k.plural for k in KINDS))
        raise UnknownKind(f'the server doesn\'t have a resource type "{name}" (known: {known})')
    return found


def resource(kind: Kind) -> str:
    """kubectl's `plural.group` name of a kind, as its errors say it.

    >>> resource(NETWORK_POLICY)
    'networkpolicies.networking.k8s.io'
    """
    group = kind.api_version.rpartition("/")[0]
    return f"{kind.plural}.{group}" if group else kind.plural


def by_kind(kind: str) -> Kind | None:
    """A kind by its `kind:` field as written in YAML (exact case, as the API server wants it)."""
    return _BY_KIND.get(kind)


class Reader(Protocol):
    """What admission reads: a datastore, or a view of one that guards an atomic write."""

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None: ...

    def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]: ...
