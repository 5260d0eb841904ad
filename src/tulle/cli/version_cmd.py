"""`tulle version` and `tulle --version`: this client's version and, given a datastore (--lab,
--datastore or $TULLE_DATASTORE), each node's agent's, as the agent publishes it on its Node.

    tulle --version
    tulle version --lab demo
    tulle version --datastore https://10.0.0.1:2379 -o json

The client's version is printed first, whatever happens next: a datastore that does not answer
is reported as the error it is, and costs nothing of the client's part.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Container, Sequence
from typing import Any

from tulle.agent.node import ANNOTATION_AGENT_VERSION, installed_version
from tulle.cli.common import add_datastore_args, open_datastore, print_json, print_table
from tulle.datastore.base import Obj
from tulle.model.kinds import NODE


class _PrintClientVersion(argparse.Action):
    """`--version`: the version, read from the package only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        print(f"tulle {installed_version()}")
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action=_PrintClientVersion, help="print this client's version and exit (`tulle version`: agents')"
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "version",
        help="this client's version and, with a datastore, each node's agent's",
        description="Print this client's version and, with --lab or --datastore (or $TULLE_DATASTORE), "
        "the version each node's agent published on its Node object and whether that agent is alive.",
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    add_datastore_args(p)
    p.set_defaults(func=run)


def agent_versions(nodes: list[Obj], alive: Container[str]) -> list[dict[str, Any]]:
    """Each node's agent version (None if its agent never published one) and liveness, by name.

    >>> nodes = [{"metadata": {"name": n, "annotations": a}} for n, a in
    ...          [("b", {ANNOTATION_AGENT_VERSION: "0.2.0"}), ("a", {})]]
    >>> agent_versions(nodes, {"b"})
    [{'node': 'a', 'version': None, 'alive': False}, {'node': 'b', 'version': '0.2.0', 'alive': True}]
    """
    rows = []
    for node in nodes:
        meta = node.get("metadata") or {}
        version = (meta.get("annotations") or {}).get(ANNOTATION_AGENT_VERSION)
        rows.append({"node": meta.get("name", ""), "version": version, "alive": meta.get("name") in alive})
    return sorted(rows, key=lambda row: str(row["node"]))


def _agent_word(row: dict[str, Any]) -> str:
    if row["alive"]:
        return "running"
    return "not running (heartbeat expired; the version is the last it published)"


def run(args: argparse.Namespace) -> int:
    client = installed_version()
    wants_agents = bool(
        args.lab or args.datastore or getattr(args, "kubeconfig", None) or os.environ.get("TULLE_DATASTORE")
    )
    if args.output == "text":
        print(f"Client Version: {client}")
        sys.stdout.flush()  # said before the datastore is tried, whatever it answers
    if not wants_agents:
        if args.output == "json":
            print_json({"clientVersion": client})
        return 0
    try:
        store = open_datastore(args)
    except Exception:
        if args.output == "json":
            print_json({"clientVersion": client})
        raise
    try:
        nodes, _ = store.list(NODE)
        rows = agent_versions(nodes, store.live_nodes())
        url = store.url
    finally:
        store.close()
    if args.output == "json":
        print_json({"clientVersion": client, "datastore": url, "agents": rows})
        return 0
    if not rows:
        print(f"Agent Versions: no node is registered at {url}")
        return 0
    print(f"Agent Versions (from the Node objects at {url}):")
    print_table(
        ["NODE", "VERSION", "AGENT"], [[row["node"], row["version"] or "unknown", _agent_word(row)] for row in rows]
    )
    return 0
