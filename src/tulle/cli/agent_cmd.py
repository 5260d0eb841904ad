"""`tulle agent` (the node daemon) and `tulle install-cni` (put the plugin on a host)."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from tulle.cli.common import UserError, add_datastore_credential_args, datastore_credentials
from tulle.cni.conflist import conflist, write_conflist
from tulle.cni.files import write_atomically

DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the node agent")
    p.add_argument("--node", default=socket.gethostname(), help="this node's name (default: the host name)")
    p.add_argument("--datastore", required=True, metavar="URL", help="etcd URL, e.g. https://10.0.0.1:2379")
    add_datastore_credential_args(p, env=False)
    p.add_argument("--mode", default="vxlan", choices=["host-gw", "vxlan", "hybrid"], help="routing between nodes")
    p.add_argument("--state-dir", default="/var/lib/tulle", help="where the agent keeps its state")
    p.add_argument("--socket", default="/run/tulle/agent.sock", help="the unix socket the CNI plugin calls")
    p.add_argument("--interface", help="the underlay interface (default: the one with the default route)")
    p.add_argument("--lease-ttl", type=int, default=15, help="seconds the node's registration outlives the agent")
    p.add_argument(
        "--node-grace",
        type=float,
        default=60.0,
        help="seconds after a node is removed (its Node object deleted) until its pods, endpoints and blocks "
        "are deleted (default: %(default)s)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=30.0,
        help="seconds between full syncs from the datastore (default: %(default)s)",
    )
    p.add_argument(
        "--verify-interval",
        type=float,
        default=90.0,
        help="seconds between syncs that read the kernel back and repair drift (default: %(default)s)",
    )
    p.add_argument("--mtu", type=int, help="pod MTU (default: from the underlay and the mode)")
    p.add_argument(
        "--max-connections-per-pod",
        type=int,
        default=16384,
        help="tracked connections a pod may hold; new ones over it are dropped (default: %(default)s)",
    )
    p.add_argument(
        "--source-verification",
        choices=["on", "off"],
        default="on",
        help="drop what a pod sends from an address or MAC not its own (default: %(default)s)",
    )
    p.add_argument("--prefix", default="/tulle", help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines kept",
    )
    p.set_defaults(func=run)

    p = sub.add_parser("install-cni", help="install the CNI plugin and its network configuration on this host")
    p.add_argument("--bin-dir", default=DEFAULT_CNI_BIN_DIR, help="where the runtime looks for CNI plugins")
    p.add_argument("--conf-dir", default=DEFAULT_CNI_CONF_DIR, help="where the runtime reads network configurations")
    p.add_argument("--socket", default="/run/tulle/agent.sock", help="the agent's socket, as `tulle agent --socket`")
    p.add_argument(
        "--state-dir",
        default="/var/lib/tulle",
        help="the agent's --state-dir, where the plugin records DELs the agent could not take",
    )
    p.add_argument("--network", default="tulle", help="the network name in the conflist")
    p.set_defaults(func=install_cni)


def run(args: argparse.Namespace) -> int:
    from tulle.agent import logs
    from tulle.agent.main import AgentConfig, run_agent

    logs.setup(args.log_level)
    tls, login = datastore_credentials(args)
    config = AgentConfig(
        node=args.node,
        datastore=args.datastore,
        datastore_tls=tls,
        datastore_login=login,
        insecure_datastore=args.insecure_datastore,
        mode=args.mode,
        prefix=args.prefix,
        state_dir=args.state_dir,
        socket=args.socket,
        interface=args.interface,
        lease_ttl=args.lease_ttl,
        node_grace=args.node_grace,
        resync_interval=args.resync,
        verify_interval=args.verify_interval,
        mtu=args.mtu,
        connection_limit=args.max_connections_per_pod,
        source_verification=args.source_verification == "on",
    )
    run_agent(config)
    return 0


def plugin_binary() -> str:
    """The built plugin (make cni): bin/cni/tulle in the checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "..", "bin", "cni", "tulle"))
    if not os.path.exists(path):
        raise UserError(f"the CNI plugin is not built: run `make cni` (expected {path})")
    return path


def install_cni(args: argparse.Namespace) -> int:
    os.makedirs(args.bin_dir, exist_ok=True)
    target = os.path.join(args.bin_dir, "tulle")
    with open(plugin_binary(), "rb") as f:
        write_atomically(target, f.read(), mode=0o755)  # a runtime never runs half a binary
    conf = write_conflist(args.conf_dir, conflist(args.network, args.socket, args.state_dir))
    print(f"installed {target}")
    print(f"installed {conf}")
    return 0
