"""`tulle connectivity test`: probe pods check pod networking and policy end to end (as
`cilium connectivity test` does), then are removed."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tulle.cli.common import UserError, print_json
from tulle.connectivity.checks import NAMESPACE


def register(sub: Any) -> None:
    group = sub.add_parser("connectivity", help="check pod networking and policy end to end with probe pods")
    groupsub = group.add_subparsers(dest="connectivity_command", metavar="COMMAND", required=True)
    p = groupsub.add_parser(
        "test",
        help="start probe pods, check pod-to-pod, pod-to-outside and policy, and remove them",
        description=(
            "Start three probe pods in a namespace of the test's own (echo and client-a on one node, "
            "client-b on another), check TCP and UDP between them on the same node and across nodes in "
            "each family, to the outside (the outside must see the node's address), and that a "
            "default-deny and an allow policy hold; then remove everything it made. Exit status: 0 when "
            "every check passed, 1 when one failed or the test could not run, 130 when interrupted."
        ),
    )
    p.add_argument("--lab", metavar="NAME", required=True, help="the lab to test (`tulle lab up`)")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NODE",
        help="node for the echo pod and client-a; given twice, the second is client-b's (default: the first two nodes)",
    )
    p.add_argument(
        "--namespace",
        default=NAMESPACE,
        metavar="NS",
        help="the test's own namespace, made and removed by it; it refuses one that holds what it did not make",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a check waits for routes or a policy to take effect (default: %(default)g)",
    )
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format (default: text)")
    p.set_defaults(func=cmd_test)


@contextmanager
def _stop_on_signals(stopping: threading.Event, say: Any) -> Iterator[None]:
    """SIGINT and SIGTERM ask the run to stop and clean up (it looks at `stopping` between its
    steps), instead of cutting a pod add or a policy write in half."""

    def handler(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            say(f"{signal.Signals(signum).name}: stopping; cleaning up first")
        stopping.set()

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def cmd_test(args: argparse.Namespace) -> int:
    from tulle.connectivity import checks, runner
    from tulle.lab.cluster import Lab
    from tulle.lab.connectivity import LabProbeCluster

    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
    text = args.output == "text"

    def say(message: str) -> None:
        print(f"  {message}...", file=sys.stderr, flush=True)

    stopping = threading.Event()
    options = runner.Options(namespace=args.namespace, nodes=tuple(args.node), timeout=args.timeout)
    widths = (0, 0)

    def planned(steps: list[checks.Step]) -> None:
        nonlocal widths
        widths = checks.column_widths(steps)

    def show(result: checks.CheckResult) -> None:
        if text:
            print(checks.format_result(result, widths), flush=True)

    try:
        with _stop_on_signals(stopping, say), LabProbeCluster(Lab(args.lab)) as cluster:
            if text:
                print(f"tulle connectivity test on {cluster.name}, namespace {options.namespace}", flush=True)
            report = runner.run(cluster, options, stopping, report=show, progress=say, planned_steps=planned)
    except checks.ConnectivityError as exc:  # the lab's and the datastore's errors are said by conventions.run
        raise UserError(str(exc)) from None
    if text:
        print(checks.summary(report))
    else:
        print_json(checks.report_json(report))
    return report.exit_code
