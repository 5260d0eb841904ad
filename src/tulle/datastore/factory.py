"""The one place a backend is made: from a URL, so that nothing outside `datastore/` knows
which backends exist or how they are built.

- `http://HOST:PORT` (or `etcd+http://HOST:PORT`): etcd v3 through its JSON gateway;
- `memory://NAME`: the in-memory backend, shared by everything in this process that opens NAME.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tulle.datastore.base import DEFAULT_PREFIX, Datastore, DatastoreError


def open_datastore(url: str, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0) -> Datastore:
    """The datastore at `url`; `prefix` keeps clusters (or tests) that share one etcd apart.
    Opening does no I/O: the first call finds out whether the datastore answers.

    >>> open_datastore("memory://doc").url
    'memory://doc'
    >>> open_datastore("ftp://x")
    Traceback (most recent call last):
    ...
    tulle.datastore.base.DatastoreError: datastore URL 'ftp://x' is neither etcd (http://HOST:PORT) nor memory://NAME
    """
    parts = urlsplit(url)
    if parts.scheme in ("http", "etcd+http") and parts.hostname:
        from tulle.datastore.etcd import EtcdDatastore
        from tulle.datastore.etcd_client import EtcdClient

        endpoint = f"http://{parts.netloc}"
        return EtcdDatastore(EtcdClient(endpoint, timeout=timeout), prefix)
    if parts.scheme == "memory" and parts.netloc:
        from tulle.datastore.memory import MemoryDatastore, memory_server

        return MemoryDatastore(memory_server(parts.netloc))
    raise DatastoreError(f"datastore URL {url!r} is neither etcd (http://HOST:PORT) nor memory://NAME")
