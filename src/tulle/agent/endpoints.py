"""The agent's record of the endpoints (pod interfaces) on its node, kept on disk.

Keyed as the CNI spec says state must be: (network name, container ID, interface name).
Each endpoint is one JSON file written atomically, so an agent killed at any point leaves
either the old or the new record, never half of one. An endpoint is recorded as `adding`
before anything is allocated, so that a crash in the middle of an ADD is rolled back on start.
The state directory and its subdirectories are 0700 and each file 0600, from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from tulle.cni.files import check_private_dir, make_private_dir, write_atomically
from tulle.model.endpoints import WorkloadEndpoint, handle_for


@dataclass
class Endpoint:
    network: str
    container_id: str
    ifname: str
    netns: str
    namespace: str
    pod: str
    host_ifname: str
    state: str = "adding"  # "adding" until the ADD completed, then "ready"
    ips: list[str] = field(default_factory=list)  # with prefix: 10.244.1.5/32
    mac: str = ""
    host_mac: str = ""
    mtu: int = 1500

    @property
    def handle(self) -> str:
        """The IPAM handle: who holds the addresses."""
        return handle_for(self.network, self.container_id, self.ifname)

    def addresses(self) -> list[str]:
        """The addresses without their prefix length."""
        return [a.split("/")[0] for a in self.ips]

    def workload(self, node: str, problems: tuple[str, ...] = ()) -> WorkloadEndpoint:
        """What the datastore says of this endpoint: its WorkloadEndpoint."""
        return WorkloadEndpoint(
            namespace=self.namespace,
            pod=self.pod,
            node=node,
            network=self.network,
            container_id=self.container_id,
            ifname=self.ifname,
            ips=tuple(self.addresses()),
            host_interface=self.host_ifname,
            mac=self.mac,
            problems=problems,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoint:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


STATE_SUBDIRS = ("endpoints", "pending-del")


def prepare_state_dir(state_dir: str) -> None:
    """The state directory and its subdirectories, made 0700 where missing; raises
    UnsafePermissions if one is not root's alone (a pending DEL names pods; an endpoint record
    what the agent trusts about a pod)."""
    for folder in (state_dir, *(os.path.join(state_dir, sub) for sub in STATE_SUBDIRS)):
        make_private_dir(folder)
        check_private_dir(folder, "the state directory" if folder == state_dir else "the state subdirectory")


def host_ifname_for(network: str, container_id: str, ifname: str) -> str:
    """The host side of the pod's veth: 'tl' and 11 hex digits, stable for one attachment."""
    digest = hashlib.sha256(handle_for(network, container_id, ifname).encode()).hexdigest()
    return "tl" + digest[:11]


class EndpointRegistry:
    """The endpoints on disk, with a copy in memory: reads never touch the disk."""

    def __init__(self, state_dir: str) -> None:
        self.folder = os.path.join(state_dir, "endpoints")
        make_private_dir(self.folder)
        self._lock = threading.Lock()
        self._cache: dict[str, Endpoint] = {}
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.folder, name)) as f:
                    ep = Endpoint.from_dict(json.load(f))
            except (OSError, ValueError, TypeError):
                continue  # a record we cannot read is garbage-collected with its addresses
            self._cache[ep.handle] = ep

    def _path(self, handle: str) -> str:
        name = hashlib.sha256(handle.encode()).hexdigest()[:32]
        return os.path.join(self.folder, name + ".json")

    def get(self, network: str, container_id: str, ifname: str) -> Endpoint | None:
        with self._lock:
            ep = self._cache.get(handle_for(network, container_id, ifname))
            return Endpoint.from_dict(ep.to_dict()) if ep else None

    def put(self, endpoint: Endpoint) -> None:
        with self._lock:
            write_atomically(self._path(endpoint.handle), json.dumps(endpoint.to_dict(), sort_keys=True).encode())
            self._cache[endpoint.handle] = Endpoint.from_dict(endpoint.to_dict())

    def remove(self, endpoint: Endpoint) -> None:
        with self._lock:
            try:
                os.unlink(self._path(endpoint.handle))
            except FileNotFoundError:
                pass
            self._cache.pop(endpoint.handle, None)

    def all(self) -> list[Endpoint]:
        with self._lock:
            return [Endpoint.from_dict(ep.to_dict()) for _, ep in sorted(self._cache.items())]
