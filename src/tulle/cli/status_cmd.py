"""`tulle status`: what each node's agent reports: readiness, pods, and policy drops per
isolated endpoint and direction (nftables counters)."""

from __future__ import annotations

import argparse
from typing import Any

from tulle.cli.common import UserError, print_json, print_table


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="agents, pods and policy drops")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lab", metavar="NAME", help="every node of the lab NAME")
    group.add_argument("--socket", default="/run/tulle/agent.sock", help="this host's agent (default: %(default)s)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=run)


def _ask(socket_path: str) -> dict[str, Any]:
    from tulle.cni.plugin import AgentUnavailable, call_agent

    try:
        answer = call_agent(socket_path, {"command": "AGENT_STATUS"}, 10.0)
    except AgentUnavailable as exc:
        return {"ready": False, "error": str(exc)}
    result: dict[str, Any] = answer.get("result", {"ready": False, "error": str(answer.get("error"))})
    return result


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.lab:
        from tulle.lab.cluster import Lab, LabError
        from tulle.lab.state import LabNotFound, load

        try:
            lab = Lab(args.lab)
            nodes = sorted(load(args.lab)["nodes"], key=lambda n: n)
        except (LabError, LabNotFound) as exc:
            raise UserError(str(exc))
        return [dict(_ask(lab.agent_socket(node)), node=node) for node in nodes]
    return [_ask(args.socket)]


def run(args: argparse.Namespace) -> int:
    reports = collect(args)
    if args.output == "json":
        print_json({"nodes": reports})
        return 0
    rows = []
    for r in reports:
        rows.append(
            [
                str(r.get("node", "?")),
                str(r.get("mode", "")),
                "yes" if r.get("ready") else "NO",
                str(len(r.get("endpoints", []))),
                str(r.get("mtu", "")),
                r.get("error") or r.get("lastError") or "",
            ]
        )
    print_table(["NODE", "MODE", "READY", "PODS", "MTU", "PROBLEM"], rows)
    drops = [
        [str(r.get("node")), d["pod"], d["direction"], f"IPv{d.get('family', 4)}", str(d["packets"])]
        for r in reports
        for d in r.get("drops", [])
        if "pod" in d
    ]
    print()
    if drops:
        print("Policy drops (packets a NetworkPolicy refused, per isolated pod and direction):")
        print_table(["NODE", "POD", "DIRECTION", "FAMILY", "PACKETS"], sorted(drops))
    else:
        print("No pod is isolated by a NetworkPolicy.")
    return 0 if all(r.get("ready") for r in reports) else 1
