"""`tulle ipam show` and `tulle ipam release` against a lab with real agents: `show --ip` names
the pod that holds an address, a release of a live pod's address is refused naming it, and a
release of a leaked address makes it the next one an ADD is given (docs/design/ipam.md,
invariant 9 and "Leaks")."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import pytest

from tests.clilib import run
from tulle.datastore.base import Datastore
from tulle.ipam.allocator import NodeAllocator
from tulle.lab.cluster import Lab
from tulle.model.endpoints import handle_for
from tulle.model.kinds import IP_POOL
from tulle.model.pools import parse_pool

from ..lablib import pod_ips, state

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"h10e{secrets.token_hex(2)}")
    try:
        lab.up(nodes=2, mode="vxlan")
        lab.add_pod("node1", "shop", "web", {}, [])
        yield lab
    finally:
        lab.down()


def _leak_on_node1(store: Datastore) -> str:
    """An IPv4 address in node1's block allocated an hour ago to a handle no endpoint has, as an
    ADD that died between its allocation and its endpoint leaves it."""
    pools = [parse_pool(obj) for obj in store.list(IP_POOL)[0]]
    allocator = NodeAllocator(store, "node1", lambda: pools, clock=lambda: time.time() - 3600)
    handle = handle_for("tulle", "h10e-died", "eth0")
    [address] = allocator.allocate(handle, [4], {"pod": "shop/died", "node": "node1"})
    return str(address)


def test_ipam_show_names_the_pod_and_release_makes_a_leak_allocatable_again(lab: Lab) -> None:
    web = pod_ips(lab, "shop/web")
    shown = run(["ipam", "show", "--lab", lab.name, "--ip", web[4]])
    assert shown.returncode == 0, str(shown)
    assert "held by pod shop/web on node node1 (interface tl" in shown.stdout, shown.stdout
    holder = json.loads(run(["ipam", "show", "--lab", lab.name, "--ip", web[6], "-o", "json"]).stdout)
    assert (holder["allocation"]["holder"]["pod"], holder["allocation"]["holder"]["node"]) == ("shop/web", "node1")

    leaked = lab.with_store(state(lab), _leak_on_node1)
    report = json.loads(run(["ipam", "show", "--lab", lab.name, "--node", "node1", "-o", "json"]).stdout)
    assert [(a["address"], a["pod"]) for a in report["leaks"]] == [(leaked, "shop/died")]

    refused = run(["ipam", "release", "--lab", lab.name, web[4]])
    assert refused.returncode == 1 and "held by pod shop/web on node node1" in refused.stderr, str(refused)
    released = run(["ipam", "release", "--lab", lab.name, leaked])
    assert released.returncode == 0, str(released)
    assert released.stdout.startswith(f"released {leaked} (handle tulle/h10e-died/eth0"), released.stdout

    # The block's lowest free address is the released one: the next pod on node1 is given it.
    lab.add_pod("node1", "shop", "next", {}, [])
    assert pod_ips(lab, "shop/next")[4] == leaked
    again = run(["ipam", "show", "--lab", lab.name, "--ip", leaked])
    assert "held by pod shop/next on node node1" in again.stdout, str(again)
