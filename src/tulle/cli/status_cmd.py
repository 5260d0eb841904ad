"""`tulle status`: what each node's agent reports: readiness and why not, pods, and policy
drops per isolated endpoint and direction (nftables counters).

Every agent is asked at once, each with a short timeout: a stuck agent or a datastore outage
must not make the report itself hang. Agents answer from what they know (no datastore call),
so an outage shows as its cause ("datastore unreachable since ...")."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tulle.cli.common import UserError, print_json, print_table


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="agents, pods and policy drops")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lab", metavar="NAME", help="every node of the lab NAME")
    group.add_argument("--socket", default="/run/tulle/agent.sock", help="this host's agent (default: %(default)s)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    p.set_defaults(func=run)


# An agent answers from memory in milliseconds; one that takes longer is stuck.
ASK_TIMEOUT_S = 3.0


def _ask(socket_path: str) -> dict[str, Any]:
    from tulle.cni.plugin import AgentUnavailable, call_agent

    try:
        answer = call_agent(socket_path, {"command": "AGENT_STATUS"}, ASK_TIMEOUT_S)
    except AgentUnavailable as exc:
        return {"ready": False, "error": f"agent not answering: {exc}"}
    result = answer.get("result")
    if not isinstance(result, dict):
        return {"ready": False, "error": f"agent answered with an error: {answer.get('error')}"}
    return result


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.lab:
        from tulle.lab.cluster import Lab, LabError
        from tulle.lab.state import LabNotFound, load

        try:
            lab = Lab(args.lab)
            nodes = sorted(load(args.lab)["nodes"], key=lambda n: n)
        except (LabError, LabNotFound) as exc:
            raise UserError(str(exc)) from None
        with ThreadPoolExecutor(max_workers=min(32, len(nodes) or 1)) as pool:
            answers = list(pool.map(_ask, [lab.agent_socket(node) for node in nodes]))
        return [dict(answer, node=node) for node, answer in zip(nodes, answers, strict=True)]
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
                r.get("error") or "; ".join(r.get("problems") or []),
            ]
        )
    print_table(["NODE", "MODE", "READY", "PODS", "MTU", "PROBLEM"], rows)
    drops = sorted(
        [str(r.get("node")), d["pod"] or "-", _why(d), str(d["packets"])]
        for r in reports
        for d in r.get("drops", [])
        if "pod" in d
    )
    print()
    if drops:
        print(
            "Drops: packets a NetworkPolicy refused (per isolated pod and direction) and packets the node's "
            "guards refused (per pod and reason):"
        )
        print_table(["NODE", "POD", "WHY", "PACKETS"], drops)
    else:
        print("No pod is isolated by a NetworkPolicy, and the guards have dropped nothing.")
    return 0 if all(r.get("ready") for r in reports) else 1


def _why(drop: dict[str, Any]) -> str:
    if "reason" in drop:
        return str(drop["reason"])
    return f"policy, {drop['direction']}, IPv{drop.get('family', 4)}"
