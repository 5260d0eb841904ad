"""`tulle lab`: the multi-node cluster in network namespaces (our test bed and demo)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from tulle.cli.common import UserError, print_json, print_table
from tulle.lab import topology


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="a 3-node lab with pods, traffic and a policy (make demo)")
    demo.add_argument("--name", default="demo", help="the lab's name (default: %(default)s)")
    demo.add_argument("--mode", choices=["host-gw", "vxlan", "hybrid"], default="hybrid", help="routing between nodes")
    demo.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    demo.set_defaults(func=run_demo)

    lab = sub.add_parser("lab", help="a multi-node cluster made of network namespaces")
    labsub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    p = labsub.add_parser("up", help="create a lab: underlay, etcd, nodes with agents")
    p.add_argument("name", metavar="LAB", help="the new lab's name: up to 8 lowercase letters and digits")
    p.add_argument(
        "--nodes", type=node_count, default=3, help=f"how many nodes to start, 1 to {topology.MAX_NODE_INDEX}"
    )
    p.add_argument(
        "--mode",
        choices=["host-gw", "vxlan", "hybrid"],
        default="vxlan",
        help="routing between nodes: host-gw (direct routes, one subnet), vxlan (a tunnel), hybrid (direct "
        "within a subnet, vxlan across)",
    )
    p.add_argument("--ipv4-only", action="store_true", help="IPv4 pools only (default: dual-stack)")
    p.add_argument("--lease-ttl", type=int, default=15, help=argparse.SUPPRESS)
    p.add_argument(
        "--node-grace",
        type=float,
        default=60.0,
        help="the agents' --node-grace: seconds after a node is removed until its pods, endpoints and "
        "blocks are deleted (default: %(default)s)",
    )
    p.add_argument("--resync", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="also run upstream Kubernetes: an API server, controller-manager and scheduler on the underlay, "
        "containerd and a kubelet on each node, with Tulle as their CNI (docs/kubernetes.md)",
    )
    p.add_argument("--json", action="store_true", help="print the lab's status as JSON")
    p.set_defaults(func=up)

    p = labsub.add_parser("kubeconfig", help="print the path of a --kubernetes lab's admin kubeconfig")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.set_defaults(func=kubeconfig)

    p = labsub.add_parser(
        "down", help="stop every process in a lab's namespaces (by PID) and remove everything of the lab"
    )
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument(
        "--ignore-not-found",
        action="store_true",
        help="succeed when there is no such lab (as kubectl delete --ignore-not-found does)",
    )
    p.set_defaults(func=down)

    p = labsub.add_parser("logs", help="print a node agent's log; with --follow, what it writes next too")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("node", metavar="NODE", help="the node's name, e.g. node1")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="go on printing what the agent writes, as tail -f does, until interrupted (Ctrl-C) or the node "
        "or lab is removed",
    )
    p.set_defaults(func=logs)

    node = labsub.add_parser("node", help="add or remove a node, or restart its agent")
    nodesub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    p = nodesub.add_parser("add", help="add a node (a namespace on the underlay) and start its agent")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("node", metavar="NODE", help="the node's name, e.g. node1")
    p.set_defaults(func=node_add)
    p = nodesub.add_parser("del", help="remove a node with its pods, as if the machine went away")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("node", metavar="NODE", help="the node's name, e.g. node1")
    p.set_defaults(func=node_del)
    p = nodesub.add_parser("restart-agent", help="stop a node's agent and start it again")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("node", metavar="NODE", help="the node's name, e.g. node1")
    p.set_defaults(func=node_restart_agent)

    pod = labsub.add_parser("pod", help="add or remove a pod")
    podsub = pod.add_subparsers(dest="pod_command", metavar="COMMAND", required=True)
    p = podsub.add_parser("add", help="add a pod on a node (CNI ADD through the node's agent, or podman)")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("node", metavar="NODE", help="the node's name, e.g. node1")
    p.add_argument("pod", metavar="NAMESPACE/POD", help="the pod")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="a label of the Pod (repeatable)")
    p.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME:NUMBER/PROTO",
        help="declare a container port in the Pod (for named ports in policies); it serves nothing "
        "unless --serve is given (repeatable; PROTO TCP, UDP or SCTP, default TCP)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="run a small server in the pod on its declared TCP and UDP ports that answers with the "
        "pod's name (like agnhost serve-hostname); stopped with the pod",
    )
    p.add_argument(
        "--runtime",
        choices=["cni", "podman"],
        default="cni",
        help="cni: a namespace and the CNI plugin alone; podman: a container (namespace default only)",
    )
    p.add_argument("--json", action="store_true", help="print the pod's node and addresses as JSON")
    p.set_defaults(func=pod_add)
    p = podsub.add_parser("del", help="delete a pod (CNI DEL, or podman rm) and its Pod object")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("pod", metavar="NAMESPACE/POD", help="the pod")
    p.set_defaults(func=pod_del)

    etcd = labsub.add_parser("etcd", help="stop, start, pause or resume the lab's etcd (to make and show faults)")
    etcdsub = etcd.add_subparsers(dest="etcd_command", metavar="COMMAND", required=True)
    for command, text in (
        ("stop", "stop etcd by its PID, keeping its data"),
        ("start", "start etcd again on the same URL and data, and wait until it answers"),
        ("pause", "freeze etcd (SIGSTOP): it keeps its connections but answers nothing"),
        ("resume", "let a paused etcd run again (SIGCONT)"),
    ):
        p = etcdsub.add_parser(command, help=text)
        p.add_argument("name", metavar="LAB", help="the lab's name")
        p.set_defaults(func=etcd_command)

    p = labsub.add_parser("exec", help="run a command in a pod's network namespace")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("pod", metavar="NAMESPACE/POD", help="the pod")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the command to run, after --")
    p.set_defaults(func=exec_in_pod)

    p = labsub.add_parser("status", help="nodes, pods and the external host of a lab")
    p.add_argument("name", metavar="LAB", help="the lab's name")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=status)


def _lab(name: str) -> Any:
    from tulle.lab.cluster import Lab, LabError

    try:
        return Lab(name)
    except LabError as exc:
        raise UserError(str(exc)) from None


def _errors() -> tuple[type[BaseException], ...]:
    from tulle.datastore.base import DatastoreError
    from tulle.lab.cluster import LabError
    from tulle.lab.kubernetes import KubernetesError
    from tulle.lab.podman import PodmanError
    from tulle.lab.runtime import CniFailure
    from tulle.lab.state import LabNotFound
    from tulle.lab.topology import TopologyError
    from tulle.model.validation import AdmissionError, ValidationError

    return (
        LabError,
        KubernetesError,
        LabNotFound,
        TopologyError,
        CniFailure,
        PodmanError,
        AdmissionError,
        ValidationError,
        DatastoreError,  # the lab's etcd stopped or paused: say so, without a traceback
    )


def _user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """What goes wrong in a lab command is the user's to fix: `error: ...`, exit status 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _errors() as exc:
            raise UserError(str(exc)) from None

    return run


@_user_errors
def run_demo(args: argparse.Namespace) -> int:
    from tulle.lab.demo import run_demo as demo

    demo(args.name, args.mode, args.keep)
    return 0


def _progress(enabled: bool) -> Any:
    def show(message: str) -> None:
        if enabled:
            print(f"  {message}...", file=sys.stderr, flush=True)

    return show


def _split_pod(value: str) -> tuple[str, str]:
    namespace, sep, pod = value.partition("/")
    if not sep or not namespace or not pod:
        raise UserError(f"{value!r} is not NAMESPACE/POD")
    return namespace, pod


def node_count(value: str) -> int:
    """--nodes: a whole number of nodes that the lab's address plan holds.

    >>> node_count("2")
    2
    >>> node_count("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: a lab has 1 to 244 nodes, not 0
    """
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= count <= topology.MAX_NODE_INDEX:
        raise argparse.ArgumentTypeError(f"a lab has 1 to {topology.MAX_NODE_INDEX} nodes, not {count}")
    return count


def up(args: argparse.Namespace) -> int:
    from tulle.lab.cluster import LabExists

    lab = _lab(args.name)
    try:
        lab.up(
            nodes=args.nodes,
            mode=args.mode,
            ipv4_only=args.ipv4_only,
            lease_ttl=args.lease_ttl,
            node_grace=args.node_grace,
            progress=_progress(not args.json),
            resync=args.resync,
            kubernetes=args.kubernetes,
        )
    except LabExists as exc:
        raise UserError(str(exc)) from None  # nothing failed: the lab is there, as it was
    except _errors() as exc:
        raise UserError(
            f"{exc}\n(the lab is left as it is for inspection; `tulle lab down {args.name}` removes it)"
        ) from None
    info = lab.status()
    if args.json:
        print_json(info)
    else:
        print(f"lab {args.name} is up: {len(info['nodes'])} nodes, {info['mode']} mode, etcd at {info['etcd']}")
    return 0


@_user_errors
def kubeconfig(args: argparse.Namespace) -> int:
    from tulle.lab import kubernetes as lab_kubernetes
    from tulle.lab import state as lab_state

    if not lab_state.load(args.name).get("kubernetes"):
        raise UserError(f"lab {args.name} runs no Kubernetes (made without --kubernetes)")
    print(lab_kubernetes.kubeconfig_path(lab_state.lab_dir(args.name)))
    return 0


def down(args: argparse.Namespace) -> int:
    from tulle.lab.state import LabNotFound

    lab = _lab(args.name)
    if not lab.exists():
        if args.ignore_not_found:
            return 0  # said nothing, as kubectl says nothing of what it did not find
        raise LabNotFound(f"there is no lab named {args.name!r} on this machine")
    lab.down(progress=_progress(True))
    print(f"lab {args.name} is down")
    return 0


@_user_errors
def logs(args: argparse.Namespace) -> int:
    from tulle.lab import logs as lab_logs
    from tulle.lab import state as lab_state

    nodes = lab_state.load(args.name)["nodes"]
    if args.node not in nodes:
        raise UserError(f"lab {args.name} has no node {args.node} (nodes: {', '.join(sorted(nodes))})")
    path = _lab(args.name).agent_log(args.node)
    if not os.path.exists(path):
        raise UserError(f"the agent of {args.node} has written no log yet ({path})")
    out = sys.stdout.buffer
    if not args.follow:
        lab_logs.print_log(path, out)
        return 0
    try:
        lab_logs.follow_log(path, out)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a follow ends
    print(f"(the log ended: node {args.node} or lab {args.name} was removed)", file=sys.stderr)
    return 0


@_user_errors
def node_add(args: argparse.Namespace) -> int:
    record = _lab(args.name).add_node(args.node)
    print(f"node {args.node} added ({', '.join(record['addresses'])})")
    return 0


@_user_errors
def node_del(args: argparse.Namespace) -> int:
    _lab(args.name).del_node(args.node)
    print(f"node {args.node} removed")
    return 0


@_user_errors
def node_restart_agent(args: argparse.Namespace) -> int:
    pid = _lab(args.name).restart_agent(args.node)
    print(f"agent of {args.node} restarted (pid {pid})")
    return 0


@_user_errors
def etcd_command(args: argparse.Namespace) -> int:
    lab = _lab(args.name)
    if args.etcd_command == "stop":
        lab.stop_etcd()
        print(f"etcd of lab {args.name} stopped")
    elif args.etcd_command == "start":
        pid = lab.start_etcd()
        print(f"etcd of lab {args.name} is running (pid {pid})")
    elif args.etcd_command == "pause":
        lab.pause_etcd()
        print(f"etcd of lab {args.name} paused")
    else:
        lab.resume_etcd()
        print(f"etcd of lab {args.name} resumed")
    return 0


def parse_port(value: str) -> dict[str, Any]:
    """NAME:NUMBER/PROTO, e.g. http:80/TCP (protocol defaults to TCP)."""
    name, sep, rest = value.partition(":")
    number, _, proto = rest.partition("/")
    if not sep or not name or not number.isdigit():
        raise UserError(f"--port {value!r}: expected NAME:NUMBER/PROTO, e.g. http:80/TCP")
    return {"name": name, "containerPort": int(number), "protocol": (proto or "TCP").upper()}


def parse_labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UserError(f"--label {value!r}: expected KEY=VALUE")
        labels[key] = val
    return labels


@_user_errors
def pod_add(args: argparse.Namespace) -> int:
    namespace, pod = _split_pod(args.pod)
    out = _lab(args.name).add_pod(
        args.node,
        namespace,
        pod,
        parse_labels(args.label),
        [parse_port(p) for p in args.port],
        args.runtime,
        serve=args.serve,
    )
    if args.json:
        print_json(out)
    else:
        serving = f" (serving {', '.join(out['serving'])})" if out.get("serving") else ""
        print(f"pod {out['pod']} on {out['node']}: {', '.join(out['ips'])}{serving}")
    return 0


@_user_errors
def pod_del(args: argparse.Namespace) -> int:
    namespace, pod = _split_pod(args.pod)
    _lab(args.name).del_pod(namespace, pod)
    print(f"pod {args.pod} deleted")
    return 0


@_user_errors
def exec_in_pod(args: argparse.Namespace) -> int:
    namespace, pod = _split_pod(args.pod)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UserError("give the command after --, e.g. tulle lab exec demo default/a -- ping -c1 10.244.0.5")
    netns = _lab(args.name).pod_netns(namespace, pod)
    sys.stdout.flush()
    # exec: stdin, stdout, stderr and the exit status are the command's own.
    os.execvp("nsenter", ["nsenter", f"--net={netns}", *cmd])
    return 127


def _process_word(state: str) -> str:
    return {"running": "running", "paused": "PAUSED"}.get(state, "STOPPED")


def _serving(server: dict[str, Any] | None) -> str:
    """A pod's `--serve` ports, and its server's state when it is not running."""
    if not server:
        return "-"
    ports = ", ".join(server["ports"])
    return ports if server["state"] == "running" else f"{ports} ({_process_word(server['state'])})"


@_user_errors
def status(args: argparse.Namespace) -> int:
    info = _lab(args.name).status()
    if args.json:
        print_json(info)
        return 0
    etcd = info["etcdServer"]["state"]
    print(f"lab {info['name']}: {info['mode']} mode, etcd at {info['etcd']} ({_process_word(etcd)})")
    rows = [
        [
            n["name"],
            ", ".join(n["addresses"]),
            f"subnet {n['subnet']}",
            _process_word(n["agent"]["state"]),
        ]
        for n in info["nodes"]
    ]
    print_table(["NODE", "ADDRESSES", "UNDERLAY", "AGENT"], rows)
    if info["pods"]:
        print()
        print_table(
            ["POD", "NODE", "IPS", "RUNTIME", "SERVING"],
            [
                [p["pod"], p["node"], ", ".join(p["ips"]), p["runtime"], _serving(p.get("serving"))]
                for p in info["pods"]
            ],
        )
    for p in info["podsInProgress"]:
        doing = "being added" if p["phase"] == "adding" else "being deleted"
        if p["stale"]:
            doing += f" by a command that died (`tulle lab pod del {info['name']} {p['pod']}` clears it)"
        print(f"pod {p['pod']} on {p['node']}: {doing}")
    for key in info["podsGone"]:
        print(f"pod {key}: gone (its namespace is gone; `tulle lab pod del {info['name']} {key}` clears it)")
    for p in info.get("podsOfRemovedNodes", []):
        print(
            f"pod {p['pod']}: its node {p['node']} was removed; the agents delete its Pod object after "
            f"--node-grace (`tulle lab pod del {info['name']} {p['pod']}` clears it now)"
        )
    if info["pendingPodDeletes"]:
        print(f"Pod objects to delete when etcd answers: {', '.join(info['pendingPodDeletes'])}")
    ext = info.get("external", {})
    if ext:
        print(f"\nexternal host: {ext.get('netns')} ({', '.join(ext.get('addresses', []))})")
    return 0
