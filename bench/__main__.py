"""`make bench` / `python -m bench [NAME...]`: run benchmarks and print their ratios.

With no NAME, the default set runs (what `make bench` runs). `cpu` is the throughput benchmark's
CPU-per-GB table alone (throughput prints it too); `scale` brings up labs of 10 and 100 nodes and
is opt-in: `python -m bench scale [--nodes 10,100] [--joins 3] [--timeout 600]`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os

DEFAULT = ["throughput", "cni", "agent", "policy", "idle"]
BENCHMARKS = [*DEFAULT, "cpu", "scale", "guard"]


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of node counts") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: node counts are 1 or more")
    return sizes


def main() -> None:
    # The library's log lines (a datastore going away as a lab is torn down) are the agent's to
    # print; a benchmark prints its tables.
    logging.getLogger().addHandler(logging.NullHandler())
    parser = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "names", nargs="*", choices=[*BENCHMARKS, []][:-1] or None, help="default: " + " ".join(DEFAULT)
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=None,
        help="throughput, cpu: length of each throughput/latency run (default 5);\n"
        "idle: length of the idle window (default 120)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=bool(os.environ.get("BENCH_QUICK")),
        help="a short smoke run (also BENCH_QUICK=1): throughput and cpu 2 rounds of 2 s;\n"
        "idle 20 pods, 100 policies, 20 s; scale 3 and 6 nodes, 2 joins",
    )
    parser.add_argument("--nodes", type=_sizes, default=None, help="scale: lab sizes (default 10,100)")
    parser.add_argument("--joins", type=int, default=None, help="scale: node joins measured per size (default 3)")
    parser.add_argument("--timeout", type=float, default=None, help="scale: seconds for one lab up (default 600)")
    parser.add_argument("--mode", choices=["host-gw", "vxlan", "hybrid"], default="vxlan", help="scale: routing mode")
    args = parser.parse_args()
    for name in args.names or DEFAULT:
        module = importlib.import_module(f"bench.{name}")
        if name in ("throughput", "cpu", "guard"):
            if args.quick:
                module.main(seconds=args.seconds or 2, rounds=2)
            else:
                module.main(seconds=args.seconds or 5)
        elif name == "idle":
            module.main(seconds=args.seconds, quick=args.quick)
        elif name == "scale":
            module.main(
                nodes=args.nodes or ([3, 6] if args.quick else None),
                joins=args.joins or (2 if args.quick else module.JOINS),
                timeout=args.timeout or module.TIMEOUT,
                mode=args.mode,
            )
        else:
            module.main()


if __name__ == "__main__":
    main()
