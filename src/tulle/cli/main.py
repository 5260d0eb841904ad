"""The `tulle` command: one verb, one object, kubectl's habits.

Each group of subcommands lives in its own module with a `register(subparsers)` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tulle.cli import agent_cmd, common, lab_cmd, policy_cmd, resources_cmd, status_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tulle", description="Tulle: Kubernetes pod networking and policy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (agent_cmd, lab_cmd, resources_cmd, policy_cmd, status_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A command says what went wrong in its own words (`error: ...`); the library's log lines
    # (a datastore outage, ...) are for the agent, which sets up its own logging.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        status = args.func(args)
    except common.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)


if __name__ == "__main__":
    main()
