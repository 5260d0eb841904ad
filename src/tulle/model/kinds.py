"""The resource kinds Tulle stores, with kubectl's names for them."""

from __future__ import annotations

from dataclasses import dataclass


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

KINDS: tuple[Kind, ...] = (NAMESPACE, POD, NODE, NETWORK_POLICY, IP_POOL, WORKLOAD_ENDPOINT)
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


def by_kind(kind: str) -> Kind | None:
    """A kind by its `kind:` field as written in YAML (exact case, as the API server wants it)."""
    return _BY_KIND.get(kind)
