"""`tulle ipam show` and `tulle ipam release` (as `calicoctl ipam show` and `release`).

    tulle ipam show --lab demo                       # pools, nodes, blocks; leaks
    tulle ipam show --lab demo --node node1 -o json
    tulle ipam show --lab demo --ip 10.244.13.2      # who holds it
    tulle ipam release --lab demo 10.244.13.9        # free a leaked address

What is a leak, and why an allocation without an endpoint is given a grace first, is in
docs/design/ipam.md ("Leaks"); the report is `tulle.ipam.report`, the release `tulle.ipam.release`.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from typing import Any

from tulle.cli.common import UserError, add_datastore_args, open_datastore, print_json, print_table
from tulle.cli.resources_cmd import human_duration
from tulle.ipam.release import read_state, release_leaked_address
from tulle.ipam.report import (
    DEFAULT_LEAK_GRACE_S,
    HELD,
    LEAKED,
    Allocation,
    Lookup,
    Report,
    Usage,
    knows_node,
    look_up,
    report,
    where_free,
)


def address_argument(text: str) -> str:
    """An IP address as blocks write it (`fd00::0001` is `fd00::1`); argparse names the argument."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def grace_argument(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return seconds


def _add_grace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--leak-grace",
        type=grace_argument,
        default=DEFAULT_LEAK_GRACE_S,
        metavar="SECONDS",
        help="an address no endpoint holds counts as leaked only once allocated this long ago "
        "(an ADD allocates before it publishes the pod's endpoint)",
    )


def register(sub: Any) -> None:
    ipam = sub.add_parser(
        "ipam",
        help="address pools, blocks and allocations; leaked addresses",
        description="What IPAM holds: pools, the blocks nodes hold, which pod holds an address, and "
        "addresses no live endpoint holds (leaks).",
    )
    verbs = ipam.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser(
        "show",
        help="pools, nodes and blocks with their addresses used and free, and leaks",
        description="Show each IPPool, node and block with its addresses in all, used and free; then the "
        "addresses allocated to a handle that no WorkloadEndpoint (or node tunnel) holds: leaks, and "
        "those too recent to call leaked. With --ip, who holds one address.",
    )
    which = show.add_mutually_exclusive_group()
    which.add_argument("--node", metavar="NODE", help="only this node's blocks and leaks")
    which.add_argument("--ip", metavar="ADDRESS", type=address_argument, help="who holds this address")
    _add_grace(show)
    show.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    add_datastore_args(show)
    show.set_defaults(func=run_show)
    release = verbs.add_parser(
        "release",
        help="free a leaked address (refused for one a live endpoint holds)",
        description="Free an address allocated to a handle that no WorkloadEndpoint holds (`tulle ipam show` "
        "lists them as leaks), by compare-and-swap on its block. An address a pod or a node's tunnel "
        "holds is refused, naming the holder; so is one allocated within --leak-grace.",
    )
    release.add_argument("address", metavar="ADDRESS", type=address_argument, help="the leaked address")
    _add_grace(release)
    add_datastore_args(release)
    release.set_defaults(func=run_release)


# -- show -----------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    store = open_datastore(args)
    try:
        state = read_state(store)
    finally:
        store.close()
    now = time.time()
    if args.ip:
        lookup = look_up(state, args.ip, now, args.leak_grace)
        if args.output == "json":
            print_json(lookup.to_json())
        else:
            print_lookup(lookup, now)
        return 0
    if args.node and not knows_node(state, args.node):
        raise UserError(f"--node: no node {args.node!r}: it is no Node and holds no block")
    shown = report(state, now, args.leak_grace, args.node)
    if args.output == "json":
        print_json(shown.to_json())
    else:
        print_report(shown, now, args.leak_grace)
    return 0


def _usage_rows(usages: list[Usage], *columns: str) -> list[list[str]]:
    return [
        [str(getattr(u, c)) for c in columns] + [str(u.blocks), str(u.total), str(u.used), str(u.free)] for u in usages
    ]


def _age(allocation: Allocation, now: float) -> str:
    age = allocation.age(now)
    return "<unknown>" if age is None else human_duration(age)


def _allocation_rows(allocations: list[Allocation], now: float) -> list[list[str]]:
    return [[a.address, a.node, a.block, a.handle, a.pod or "<none>", _age(a, now)] for a in allocations]


def print_report(shown: Report, now: float, grace: float) -> None:
    counts = ["BLOCKS", "TOTAL", "USED", "FREE"]
    if shown.pools:
        print_table(["POOL", "CIDR", *counts], _usage_rows(shown.pools, "name", "cidr"))
        print()
    print_table(["NODE", *counts], _usage_rows(shown.nodes, "name"))
    print()
    if shown.blocks:
        rows = [[u.cidr, u.pool, u.node, str(u.total), str(u.used), str(u.free)] for u in shown.blocks]
        print_table(["BLOCK", "POOL", "NODE", "TOTAL", "USED", "FREE"], rows)
    else:
        print("No block is claimed.")
    print()
    columns = ["ADDRESS", "NODE", "BLOCK", "HANDLE", "POD", "AGE"]
    if shown.leaks:
        print("Leaks: allocated addresses no endpoint holds (`tulle ipam release ADDRESS` frees one):")
        print_table(columns, _allocation_rows(shown.leaks, now))
    else:
        print("No leaks: every allocated address is held by a pod's endpoint or a node's tunnel.")
    if shown.recent:
        print()
        print(f"Allocated less than {grace:g} s ago, no endpoint yet (an ADD may be in progress):")
        print_table(columns, _allocation_rows(shown.recent, now))
    for unreadable in shown.unreadable_endpoints:
        print(f"warning: WorkloadEndpoint {unreadable} cannot be read; an address it holds may show as leaked")


def _status(allocation: Allocation, now: float) -> str:
    if allocation.status == HELD and allocation.holder is not None:
        return f"held by {allocation.holder.describe()}"
    if allocation.status == LEAKED:
        return f"leaked: no endpoint holds it (`tulle ipam release {allocation.address}` frees it)"
    return f"allocated {_age(allocation, now)} ago, no endpoint holds it yet (an ADD may be in progress)"


def print_lookup(lookup: Lookup, now: float) -> None:
    allocation = lookup.allocation
    lines = [("Address", lookup.address)]
    if lookup.pool is not None:
        lines.append(("Pool", f"{lookup.pool.name} ({lookup.pool.cidr})"))
    if lookup.block is not None:
        lines.append(("Block", f"{lookup.block.cidr} (node {lookup.block.node})"))
    if allocation is None:
        lines.append(("Status", f"not allocated: {where_free(lookup)}"))
    else:
        lines.append(("Status", _status(allocation, now)))
        lines.append(("Handle", allocation.handle))
        if allocation.pod:
            lines.append(("Recorded for", f"pod {allocation.pod}"))
        stamp = allocation.to_json()["allocatedAt"]
        lines.append(("Allocated", f"{stamp} ({_age(allocation, now)} ago)" if stamp else "<unknown>"))
    width = max(len(label) for label, _ in lines) + 2
    for label, value in lines:
        print(f"{label + ':':<{width}}{value}")


# -- release --------------------------------------------------------------------------------


def run_release(args: argparse.Namespace) -> int:
    store = open_datastore(args)
    try:
        freed = release_leaked_address(store, args.address, args.leak_grace)
    finally:
        store.close()
    recorded = f", recorded for pod {freed.pod}" if freed.pod else ""
    print(f"released {freed.address} (handle {freed.handle}{recorded}) in block {freed.block} of node {freed.node}")
    return 0
