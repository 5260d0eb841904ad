"""The etcd v3 backend.

Why etcd3gw: it is maintained (OpenStack releases it, typed, 2.x in 2025), pure Python over
etcd's v3 JSON gateway, and needs only `requests`. The alternatives cost more: PyPI's `etcd3`
has had no release since 2020 and pins old grpcio/protobuf; `aetcd` pulls in grpcio (~20 MB of
RSS and a slow import) and forces asyncio on every caller. The agent's RSS budget is 60 MB.

We use etcd3gw for requests, leases, create-if-absent and transactions, and read ranges and
watch streams ourselves: etcd3gw's range hides the store revision a read was made at, and its
watch thread swallows a broken stream (the iterator then blocks for ever). Both are needed so
that `list` + `watch` from the listed revision misses no change and a lost stream is noticed.
"""

from __future__ import annotations

import base64
import json
import queue
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

from tulle.datastore.base import (
    DatastoreError,
    DeleteOp,
    KeyValue,
    PutOp,
    TxnOp,
    UnchangedOp,
    WatchEvent,
    WatchExpired,
)

# etcd's --max-txn-ops default: a transaction may hold at most this many compares and this
# many writes; etcd answers a bigger one with a bare "Bad Request".
MAX_TXN_OPS = 128

_TxnRequests = list[dict[str, Any]]  # the class's `list` method hides the builtin from mypy there


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _range_end(prefix: str) -> str:
    """The smallest key greater than every key that starts with prefix."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return _b64(bytes(raw[: i + 1]))
    return _b64(b"\0")


class EtcdWatch:
    """A watch stream on a prefix, read by a thread and handed over through a queue."""

    def __init__(self, store: EtcdDatastore, prefix: str, start_revision: int) -> None:
        self._queue: queue.Queue[WatchEvent | BaseException | None] = queue.Queue()
        self._cancelled = threading.Event()
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _range_end(prefix),
                "start_revision": start_revision,
            }
        }
        try:
            self._response = store.session.post(store.url("watch"), json=body, stream=True, timeout=(5, None))
        except requests.RequestException as exc:
            raise DatastoreError(f"etcd at {store.endpoint} is unreachable: {exc}") from exc
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {prefix}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines(chunk_size=None):
                if self._cancelled.is_set():
                    break
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise DatastoreError(f"etcd watch failed: {chunk['error']}")
                result = chunk.get("result", {})
                if result.get("compact_revision") and int(result["compact_revision"]) > 0:
                    raise WatchExpired(f"revision compacted at {result['compact_revision']}")
                if result.get("canceled"):
                    raise WatchExpired(result.get("cancel_reason", "watch cancelled by etcd"))
                for event in result.get("events", []):
                    kv = event["kv"]
                    self._queue.put(
                        WatchEvent(
                            kind="delete" if event.get("type") == "DELETE" else "put",
                            key=_unb64(kv["key"]).decode(),
                            value=_unb64(kv.get("value")),
                            mod_revision=int(kv.get("mod_revision", 0)),
                        )
                    )
            if not self._cancelled.is_set():
                raise DatastoreError("etcd closed the watch stream")
        except BaseException as exc:
            if not self._cancelled.is_set():
                self._queue.put(
                    exc if isinstance(exc, DatastoreError) else DatastoreError(f"etcd watch: {exc}")
                )
        finally:
            self._queue.put(None)

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def get(self, timeout: float) -> WatchEvent | None:
        """The next event, or None after timeout; raises when the stream broke."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            raise DatastoreError("watch ended")
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Stop the stream. Closing the response from here would wait for the reader thread's
        lock, so shut the socket down first: the reader then sees end of stream and exits."""
        self._cancelled.set()
        try:
            fileno = self._response.raw.fileno()
            dup = socket.fromfd(fileno, socket.AF_INET, socket.SOCK_STREAM)
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()
        except (OSError, AttributeError, ValueError):
            pass
        self._thread.join(timeout=5)
        try:
            self._response.close()
        except Exception:
            pass


class EtcdDatastore:
    """etcd v3 through its JSON gateway. `endpoint` is a URL such as http://127.0.0.1:2379."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DatastoreError(
                f"datastore URL {endpoint!r} is not an etcd URL such as http://127.0.0.1:2379"
            )
        self.endpoint = endpoint
        self._client = Etcd3Client(
            host=parts.hostname,
            port=parts.port or 2379,
            protocol=parts.scheme,
            timeout=timeout,
            api_path="/v3/",
        )
        self.session: requests.Session = self._client.session
        self._timeout = timeout

    def url(self, path: str) -> str:
        return str(self._client.get_url(path))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (Etcd3Exception, requests.RequestException) as exc:
            raise DatastoreError(f"etcd at {self.endpoint} failed {what}: {exc}") from exc

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self._call(path, self._client.post, self.url(path), json=body)
        return out

    @staticmethod
    def _kv(raw: dict[str, Any]) -> KeyValue:
        return KeyValue(
            key=_unb64(raw["key"]).decode(),
            value=_unb64(raw.get("value")),
            mod_revision=int(raw.get("mod_revision", 0)),
            lease=int(raw.get("lease", 0)),
        )

    def get(self, key: str) -> KeyValue | None:
        resp = self._post("kv/range", {"key": _b64(key)})
        kvs = resp.get("kvs", [])
        return self._kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        resp = self._post("kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        return [self._kv(kv) for kv in resp.get("kvs", [])], int(resp["header"]["revision"])

    def revision(self) -> int:
        resp = self._post("kv/range", {"key": _b64("\0"), "limit": 1})
        return int(resp["header"]["revision"])

    def watch(self, prefix: str, start_revision: int) -> EtcdWatch:
        return EtcdWatch(self, prefix, start_revision)

    def _txn(self, compare: _TxnRequests, success: _TxnRequests) -> bool:
        txn = {"compare": compare, "success": success, "failure": []}
        return bool(self._call("a transaction", self._client.transaction, txn).get("succeeded", False))

    @staticmethod
    def _put_op(key: str, value: bytes, lease: int) -> dict[str, Any]:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        return {"request_put": put}

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        held = Lease(lease, self._client) if lease else None
        return bool(self._call(f"to create {key}", self._client.create, key, value, lease=held))

    def update(self, key: str, value: bytes, expected_revision: int, lease: int = 0) -> bool:
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}]
        return self._txn(compare, [self._put_op(key, value, lease)])

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("kv/put", body)["header"]["revision"])

    def delete(self, key: str, expected_revision: int | None = None) -> bool:
        if expected_revision is None:
            return int(self._post("kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}]
        return self._txn(compare, [{"request_delete_range": {"key": _b64(key)}}])

    def delete_prefix(self, prefix: str) -> int:
        resp = self._post("kv/deleterange", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        return int(resp.get("deleted", 0))

    def commit(self, ops: Sequence[TxnOp]) -> int | None:
        compare: _TxnRequests = []
        success: _TxnRequests = []
        written: set[str] = set()
        for op in ops:
            if isinstance(op, UnchangedOp):
                if op.prefix:
                    compare.append(
                        {
                            "key": _b64(op.key),
                            "range_end": _range_end(op.key),
                            "result": "LESS",
                            "target": "MOD",
                            "mod_revision": op.revision + 1,
                        }
                    )
                else:
                    compare.append(
                        {"key": _b64(op.key), "result": "EQUAL", "target": "MOD", "mod_revision": op.revision}
                    )
                continue
            # etcd refuses a transaction that writes one key twice, with the same bare "Bad Request"
            if op.key in written:
                raise ValueError(f"one transaction writes {op.key} twice")
            written.add(op.key)
            if op.expected_revision is not None:
                if isinstance(op, DeleteOp) and op.prefix:
                    raise ValueError("a prefix delete cannot expect a revision")
                compare.append(
                    {
                        "key": _b64(op.key),
                        "result": "EQUAL",
                        "target": "MOD",
                        "mod_revision": op.expected_revision,
                    }
                )
            if isinstance(op, PutOp):
                success.append(self._put_op(op.key, op.value, op.lease))
            elif op.prefix:
                success.append(
                    {"request_delete_range": {"key": _b64(op.key), "range_end": _range_end(op.key)}}
                )
            else:
                success.append({"request_delete_range": {"key": _b64(op.key)}})
        if len(compare) > MAX_TXN_OPS or len(success) > MAX_TXN_OPS:
            raise DatastoreError(
                f"one etcd transaction may hold at most {MAX_TXN_OPS} writes and {MAX_TXN_OPS} conditions; "
                f"this one has {len(success)} and {len(compare)}: split the change"
            )
        txn = {"compare": compare, "success": success, "failure": []}
        resp = self._call("a transaction", self._client.transaction, txn)
        if not resp.get("succeeded", False):
            return None
        return int(resp["header"]["revision"])

    def grant_lease(self, ttl_seconds: int) -> int:
        return int(self._call("to grant a lease", self._client.lease, ttl_seconds).id)

    def keepalive(self, lease: int) -> int:
        return int(self._call("to keep a lease alive", Lease(lease, self._client).refresh))

    def revoke_lease(self, lease: int) -> None:
        self._call("to revoke a lease", Lease(lease, self._client).revoke)

    def healthy(self) -> bool:
        try:
            self.revision()
            return True
        except DatastoreError:
            return False

    def close(self) -> None:
        self.session.close()


def connect(url: str) -> EtcdDatastore:
    """Open the datastore named by URL (only etcd for now: http://HOST:PORT)."""
    return EtcdDatastore(url)
