"""`make bench` / `python -m bench [NAME...]`: run benchmarks and print their ratios."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ["throughput", "cni", "agent", "policy"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []][:-1] or None, help="default: all")
    parser.add_argument("--seconds", type=int, default=5, help="length of each throughput/latency run")
    args = parser.parse_args()
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        if name == "throughput":
            module.main(seconds=args.seconds)
        else:
            module.main()


if __name__ == "__main__":
    main()
