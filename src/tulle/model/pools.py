"""IP pools and their blocks: pure address arithmetic, no I/O.

A pool (an IPPool object) is a CIDR split into blocks of `blockSize` prefix length; a node
claims whole blocks and gives addresses from them to its pods. See docs/design/ipam.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
# A block smaller than this leaves too few addresses to be worth a route.
MAX_BLOCK_PREFIX = {4: 30, 6: 126}


NO_VALUE: Any = object()  # a PoolError about a field that has no value to show


class PoolError(ValueError):
    """An IPPool that cannot be used: which pool, which field, the kind of error (as the API
    server's field errors name it: "Required value", "Invalid value", "unknown field"), the
    refused value and why. Its text is `IPPool NAME: FIELD: TYPE VALUE: DETAIL`."""

    def __init__(self, pool: str | None, field: str, error_type: str, value: Any = NO_VALUE, detail: str = "") -> None:
        self.pool = pool
        self.field = field
        self.error_type = error_type
        self.value = value
        self.detail = detail
        text = error_type if value is NO_VALUE else f"{error_type} {value!r}"
        if error_type == "unknown field":
            field, text = field.rpartition(".")[0], f'unknown field "{field.rpartition(".")[2]}"'
        where = f"IPPool {pool}: " if pool else ""
        super().__init__(f"{where}{field}: {text}" + (f": {detail}" if detail else ""))


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: IPNetwork
    block_size: int

    @property
    def family(self) -> int:
        return self.cidr.version

    def block_count(self) -> int:
        return int(2 ** (self.block_size - self.cidr.prefixlen))

    def block(self, index: int) -> IPNetwork:
        size = 2 ** (self.cidr.max_prefixlen - self.block_size)
        start = int(self.cidr.network_address) + index * size
        return ipaddress.ip_network((start, self.block_size))

    def blocks_from(self, node: str) -> Iterator[IPNetwork]:
        """Every block once, starting at a place that depends on the node.

        Nodes that start together then try different blocks first, so that claims rarely race.
        """
        count = self.block_count()
        start = int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big") % count
        for i in range(count):
            yield self.block((start + i) % count)


def parse_pool(obj: dict[str, Any]) -> Pool:
    """An IPPool object as a Pool; PoolError names the field that is wrong."""
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or not name:
        raise PoolError(None, "metadata.name", "Required value")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise PoolError(name, "spec", "Required value")
    raw = spec.get("cidr")
    if not isinstance(raw, str) or not raw:
        raise PoolError(name, "spec.cidr", "Required value")
    try:
        cidr = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise PoolError(name, "spec.cidr", "Invalid value", raw, f"must be a network in CIDR form ({exc})") from None
    if "/" not in raw:
        raise PoolError(name, "spec.cidr", "Invalid value", raw, "must be a network in CIDR form")
    family = cidr.version
    block_size = spec.get("blockSize", DEFAULT_BLOCK_SIZE[family])
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise PoolError(name, "spec.blockSize", "Invalid value", block_size, "must be a whole number")
    if not cidr.prefixlen <= block_size <= MAX_BLOCK_PREFIX[family]:
        raise PoolError(
            name,
            "spec.blockSize",
            "Invalid value",
            block_size,
            f"must be from the pool's prefix length {cidr.prefixlen} to {MAX_BLOCK_PREFIX[family]} for IPv{family}",
        )
    unknown = set(spec) - {"cidr", "blockSize"}
    if unknown:
        raise PoolError(name, f"spec.{sorted(unknown)[0]}", "unknown field")
    return Pool(name=name, cidr=cidr, block_size=block_size)


def check_no_overlap(pools: list[Pool]) -> None:
    """Two pools that share addresses would hand one address out twice."""
    for i, a in enumerate(pools):
        for b in pools[i + 1 :]:
            if a.family == b.family and a.cidr.overlaps(b.cidr):
                raise PoolError(
                    b.name, "spec.cidr", "Invalid value", str(b.cidr), f"overlaps IPPool {a.name} ({a.cidr})"
                )


def pool_object(name: str, cidr: str, block_size: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"cidr": cidr}
    if block_size is not None:
        spec["blockSize"] = block_size
    return {"apiVersion": "tulle.dev/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": spec}
