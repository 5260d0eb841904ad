"""A kubeconfig's current context, read into what the Kubernetes client needs: the server's URL,
the CA that signed its certificate, and this client's credential (a certificate and key, or a
bearer token). Inline `*-data` fields are written to private files, because Python's ssl module
loads certificate chains only from files."""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from tulle.datastore.base import CredentialsError


@dataclass(frozen=True)
class KubeCredentials:
    server: str  # https://HOST:PORT
    ca: str | None  # a file; None: the system's trust store
    cert: str | None = None
    key: str | None = None
    token: str | None = None
    source: str = ""  # the kubeconfig it came from, for messages
    temporary: tuple[str, ...] = ()  # copies of inline -data, removed once loaded (remove_temporary)


def remove_temporary(credentials: KubeCredentials) -> None:
    """Remove the private copies of a kubeconfig's inline data, once the TLS context holds them."""
    for path in credentials.temporary:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _named(entries: Any, name: str, what: str, path: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(what), dict):
            return dict(entry[what])
    raise CredentialsError(f"{path}: no {what} named {name!r}")


def _file(section: dict[str, Any], field: str, base: str, path: str) -> str | None:
    """The file a field names (relative to the kubeconfig), or a private copy of its -data."""
    if section.get(f"{field}-data"):
        try:
            data = base64.b64decode(section[f"{field}-data"], validate=True)
        except ValueError:
            raise CredentialsError(f"{path}: {field}-data is not base64") from None
        fd, name = tempfile.mkstemp(prefix=f"tulle-kube-{field}-")  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name
    value = section.get(field)
    if not value:
        return None
    return str(value) if os.path.isabs(str(value)) else os.path.join(base, str(value))


def read_kubeconfig(path: str) -> KubeCredentials:
    """The current context of the kubeconfig at `path`; CredentialsError names what is wrong."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise CredentialsError(f"kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CredentialsError(f"kubeconfig {path} is not YAML: {exc}") from None
    if not isinstance(config, dict):
        raise CredentialsError(f"kubeconfig {path} is not a kubeconfig")
    base = os.path.dirname(os.path.abspath(path))
    context = _named(config.get("contexts"), str(config.get("current-context", "")), "context", path)
    cluster = _named(config.get("clusters"), str(context.get("cluster", "")), "cluster", path)
    user = _named(config.get("users"), str(context.get("user", "")), "user", path) if context.get("user") else {}
    server = str(cluster.get("server", "")).rstrip("/")
    if not server.startswith("https://"):
        raise CredentialsError(f"kubeconfig {path}: cluster server {server!r} is not https://")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            with open(str(user["tokenFile"])) as f:
                token = f.read().strip()
        except OSError as exc:
            raise CredentialsError(f"kubeconfig {path}: tokenFile {user['tokenFile']}: {exc.strerror}") from None
    ca = _file(cluster, "certificate-authority", base, path)
    cert = _file(user, "client-certificate", base, path)
    key = _file(user, "client-key", base, path)
    inline = (("certificate-authority", cluster, ca), ("client-certificate", user, cert), ("client-key", user, key))
    temporary = tuple(str(file) for field, section, file in inline if section.get(f"{field}-data"))
    return KubeCredentials(server, ca, cert, key, str(token) if token else None, path, temporary)


def write_kubeconfig(path: str, server: str, ca: str, cert: str, key: str, name: str = "tulle") -> None:
    """A kubeconfig (mode 0600) that reaches `server` with a client certificate, by file path."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": name, "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
