"""The `tulle` command: one verb, one object, kubectl's habits.

Each group of subcommands lives in its own module with a `register(subparsers)` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tulle.cli import (
    agent_cmd,
    connectivity_cmd,
    conventions,
    describe_cmd,
    ipam_cmd,
    lab_cmd,
    policy_cmd,
    resources_cmd,
    status_cmd,
    version_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = conventions.CliParser(prog="tulle", description="Tulle: Kubernetes pod networking and policy")
    version_cmd.add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        agent_cmd,
        lab_cmd,
        resources_cmd,
        describe_cmd,
        policy_cmd,
        ipam_cmd,
        status_cmd,
        version_cmd,
        connectivity_cmd,
    ):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    # A command says what went wrong in its own words (`error: ...`); the library's log lines
    # (a datastore outage, ...) are for the agent, which sets up its own logging.
    logging.getLogger().addHandler(logging.NullHandler())
    sys.exit(conventions.run(build_parser(), None if argv is None else list(argv)))


if __name__ == "__main__":
    main()
