"""What every `tulle` subcommand shares: reaching the datastore, errors, output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tulle.datastore.base import DEFAULT_PREFIX, AtomicWriter, Datastore, DatastoreError
from tulle.datastore.factory import open_datastore as open_url


class UserError(Exception):
    """Something the user can fix; printed as `error: ...` and exit status 1."""


def add_datastore_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lab", metavar="NAME", help="use the datastore of the lab NAME (`tulle lab up`)")
    group.add_argument("--datastore", metavar="URL", help="etcd URL, e.g. http://127.0.0.1:2379")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)


def open_datastore(args: argparse.Namespace) -> Datastore:
    """The datastore named by --lab or --datastore (or $TULLE_DATASTORE), checked to answer."""
    import os

    from tulle.model.kinds import NAMESPACE

    url = getattr(args, "datastore", None) or os.environ.get("TULLE_DATASTORE")
    lab = getattr(args, "lab", None)
    if lab:
        from tulle.lab.state import enter_lab_datastore

        url = enter_lab_datastore(lab)
    if not url:
        raise UserError("say which datastore to use: --lab NAME or --datastore URL (or set TULLE_DATASTORE)")
    try:
        store = open_url(url, getattr(args, "prefix", DEFAULT_PREFIX))
        store.get(NAMESPACE, "default")
    except DatastoreError as exc:
        raise UserError(str(exc)) from None
    return store


def atomic_writer(store: Datastore) -> AtomicWriter:
    """The datastore's multi-object writes; every backend Tulle has offers them."""
    if not isinstance(store, AtomicWriter):
        raise UserError(f"the datastore at {store.url} cannot write several objects at once")
    return store


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in [headers, *rows]:
        print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
