"""The one place a backend is made: from a URL, so that nothing outside `datastore/` knows
which backends exist or how they are built.

- `https://HOST:PORT` (or `etcd+https://HOST:PORT`): etcd v3 through its JSON gateway, over TLS
  with a client certificate (`tls`), and as an etcd user where etcd's RBAC is on (`login`);
- `http://HOST:PORT` (or `etcd+http://`): the same in plain HTTP, refused unless the caller
  says `insecure`: whoever reaches such an etcd (a pod, on most networks) can read and rewrite
  every object, so it takes a deliberate choice, and the caller warns at every start;
- `memory://NAME`: the in-memory backend, shared by everything in this process that opens NAME;
- `kubernetes:///PATH/TO/KUBECONFIG` (`kubernetes://` alone: $KUBECONFIG, else ~/.kube/config):
  the Kubernetes API server of that kubeconfig's current context, with its credential (the CLI's
  `--kubeconfig PATH` says the same); `prefix` does not apply (the API server has its own).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tulle.datastore.base import DEFAULT_PREFIX, Datastore, DatastoreError, Login, TlsFiles


def insecure_warning(url: str) -> str:
    """What a process that runs on a plain-HTTP datastore says when it starts."""
    return (
        f"the datastore {url} is plain HTTP without authentication (--insecure-datastore): "
        "anything that reaches it, a pod included, can read and rewrite every object"
    )


def open_datastore(
    url: str,
    prefix: str = DEFAULT_PREFIX,
    timeout: float = 5.0,
    *,
    tls: TlsFiles | None = None,
    login: Login | None = None,
    insecure: bool = False,
) -> Datastore:
    """The datastore at `url`; `prefix` keeps clusters (or tests) that share one etcd apart.
    Opening reads and checks the TLS files (CredentialsError names the one at fault) but does no
    network I/O: the first call finds out whether the datastore answers.

    >>> open_datastore("memory://doc").url
    'memory://doc'
    >>> open_datastore("ftp://x")
    Traceback (most recent call last):
    ...
    tulle.datastore.base.DatastoreError: datastore URL 'ftp://x' is neither etcd (https://HOST:PORT), ...
    >>> open_datastore("http://127.0.0.1:2379")
    Traceback (most recent call last):
    ...
    tulle.datastore.base.DatastoreError: refusing plain-HTTP etcd at http://127.0.0.1:2379: ...
    """
    parts = urlsplit(url)
    scheme = parts.scheme.removeprefix("etcd+")
    if scheme in ("http", "https") and parts.hostname:
        from tulle.datastore.etcd import EtcdDatastore
        from tulle.datastore.etcd_client import EtcdClient

        endpoint = f"{scheme}://{parts.netloc}"
        if scheme == "http" and not insecure:
            raise DatastoreError(
                f"refusing plain-HTTP etcd at {endpoint}: anything that reaches it can read and rewrite "
                "the cluster; use https:// with --datastore-ca, --datastore-cert and --datastore-key, "
                "or say --insecure-datastore"
            )
        if scheme == "http" and tls is not None:
            raise DatastoreError(f"TLS files were given for plain-HTTP etcd at {endpoint}: use https://")
        if scheme == "https" and tls is None:
            raise DatastoreError(
                f"etcd at {endpoint} needs this client's TLS files: --datastore-ca, --datastore-cert "
                "and --datastore-key"
            )
        return EtcdDatastore(EtcdClient(endpoint, timeout=timeout, tls=tls, login=login), prefix)
    if parts.scheme == "kubernetes":
        return _open_kubernetes(parts.path or kubeconfig_default(), timeout)
    if parts.scheme == "memory" and parts.netloc:
        from tulle.datastore.memory import MemoryDatastore, memory_server

        return MemoryDatastore(memory_server(parts.netloc))
    raise DatastoreError(
        f"datastore URL {url!r} is neither etcd (https://HOST:PORT), kubernetes:///KUBECONFIG nor memory://NAME"
    )


def kubeconfig_default() -> str:
    """Where kubectl looks: the first file of $KUBECONFIG, else ~/.kube/config."""
    import os

    listed = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return listed or os.path.expanduser("~/.kube/config")


def kubernetes_url(kubeconfig: str) -> str:
    """The datastore URL of a kubeconfig file.

    >>> kubernetes_url("/etc/tulle/agent.kubeconfig")
    'kubernetes:///etc/tulle/agent.kubeconfig'
    """
    import os

    return f"kubernetes://{os.path.abspath(kubeconfig)}"


def _open_kubernetes(kubeconfig: str, timeout: float) -> Datastore:
    from tulle.datastore.kube_client import KubeClient
    from tulle.datastore.kubeconfig import read_kubeconfig
    from tulle.datastore.kubernetes import KubernetesDatastore

    return KubernetesDatastore(KubeClient(read_kubeconfig(kubeconfig), timeout=timeout))
