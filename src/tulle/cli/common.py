"""What every `tulle` subcommand shares: reaching the datastore, errors, output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from tulle.datastore.base import DEFAULT_PREFIX, AtomicWriter, Datastore, DatastoreError, Login, TlsFiles
from tulle.datastore.factory import insecure_warning, kubernetes_url
from tulle.datastore.factory import open_datastore as open_url


class UserError(Exception):
    """Something the user can fix; printed as `error: ...` and exit status 1."""


def add_datastore_credential_args(parser: argparse.ArgumentParser, env: bool) -> None:
    """The flags that say how this client proves itself to etcd (docs/deployment.md); with
    `env`, each can come from $TULLE_DATASTORE_<NAME> instead."""

    def helped(text: str, name: str) -> str:
        return f"{text} (or ${_ENV_PREFIX}{name})" if env else text

    parser.add_argument("--datastore-ca", metavar="FILE", help=helped("CA bundle that verifies etcd", "CA"))
    parser.add_argument("--datastore-cert", metavar="FILE", help=helped("this client's certificate", "CERT"))
    parser.add_argument("--datastore-key", metavar="FILE", help=helped("this client's private key", "KEY"))
    parser.add_argument("--datastore-user", metavar="NAME", help=helped("etcd user, where RBAC is on", "USER"))
    parser.add_argument(
        "--datastore-password-file", metavar="FILE", help=helped("file holding that user's password", "PASSWORD_FILE")
    )
    parser.add_argument(
        "--insecure-datastore",
        action="store_true",
        help="accept a plain http:// etcd that anyone who reaches it can read and rewrite",
    )


_ENV_PREFIX = "TULLE_DATASTORE_"


def datastore_credentials(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> tuple[TlsFiles | None, Login | None]:
    """The TLS files and login the flags give (or, with `env`, its TULLE_DATASTORE_* values).

    >>> ns = argparse.Namespace(datastore_ca="ca.crt", datastore_cert=None, datastore_key="k")
    >>> datastore_credentials(ns)
    Traceback (most recent call last):
    ...
    tulle.cli.common.UserError: --datastore-ca, --datastore-cert and --datastore-key go together; missing: ...
    """

    def value(name: str) -> str | None:
        given = getattr(args, f"datastore_{name}", None)
        if given is None and env is not None:
            given = env.get(_ENV_PREFIX + name.upper()) or None
        return str(given) if given is not None else None

    tls_names = ("ca", "cert", "key")
    tls_given = {name: value(name) for name in tls_names}
    missing = [f"--datastore-{name}" for name, path in tls_given.items() if not path]
    tls = None
    if len(missing) < len(tls_names):
        if missing:
            raise UserError(
                f"--datastore-ca, --datastore-cert and --datastore-key go together; missing: {', '.join(missing)}"
            )
        tls = TlsFiles(*(str(tls_given[name]) for name in tls_names))
    user, password_file = value("user"), value("password_file")
    if bool(user) != bool(password_file):
        raise UserError("--datastore-user and --datastore-password-file go together")
    return tls, Login(user, password_file) if user and password_file else None


def add_datastore_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lab", metavar="NAME", help="use the datastore of the lab NAME (`tulle lab up`)")
    group.add_argument("--datastore", metavar="URL", help="etcd URL, e.g. https://127.0.0.1:2379")
    group.add_argument(
        "--kubeconfig", metavar="PATH", help="use the Kubernetes API of this kubeconfig's current context"
    )
    add_datastore_credential_args(parser, env=True)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)


def open_datastore(args: argparse.Namespace) -> Datastore:
    """The datastore named by --lab or --datastore (or $TULLE_DATASTORE), checked to answer: with
    the credentials the flags or $TULLE_DATASTORE_* give, or a lab's admin credentials."""
    from tulle.model.kinds import NAMESPACE

    url = getattr(args, "datastore", None) or os.environ.get("TULLE_DATASTORE")
    kubeconfig = getattr(args, "kubeconfig", None)
    if kubeconfig:
        url = kubernetes_url(kubeconfig)
    tls, login = datastore_credentials(args, os.environ)
    insecure = bool(getattr(args, "insecure_datastore", False))
    lab = getattr(args, "lab", None)
    if lab:
        from tulle.lab.state import enter_lab_datastore

        access = enter_lab_datastore(lab)
        url, tls, login = access.url, access.tls, access.login
    if not url:
        raise UserError(
            "say which datastore to use: --lab NAME, --datastore URL or --kubeconfig PATH (or set TULLE_DATASTORE)"
        )
    if insecure and url.startswith(("http:", "etcd+http:")):
        print(f"warning: {insecure_warning(url)}", file=sys.stderr)
    try:
        store = open_url(url, getattr(args, "prefix", DEFAULT_PREFIX), tls=tls, login=login, insecure=insecure)
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
