"""etcd's v3 JSON gateway spoken with the standard library: keys, revisions, transactions,
leases and watches. Only the etcd backend (`tulle.datastore.etcd`) uses it.

Why not a client library: the maintained ones cost the agent more memory than it may use.
etcd3gw (OpenStack's, the maintained choice for the JSON gateway) imports requests, urllib3,
charset_normalizer and futurist: +21 MB of RSS at import, measured here, against +7 MB for
http.client and json; the agent's budget is 60 MB with 100 pods. PyPI's `etcd3` has had no
release since 2020 and pins old grpcio/protobuf; `aetcd` needs grpcio (~20 MB and a slow
import) and asyncio everywhere. The gateway protocol we need is small: range, put, delete,
txn, lease grant/keepalive/revoke and a watch stream, each a POST of a JSON body.

Every call raises DatastoreError (never a transport exception) so callers handle one thing.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tulle.datastore.base import DatastoreError, Reachability, ReachabilityTracker, WatchExpired

log = logging.getLogger(__name__)

# etcd's --max-txn-ops default: a transaction may hold at most this many compares and this
# many writes; etcd answers a bigger one with a bare "Bad Request".
MAX_TXN_OPS = 128

# google.rpc.Code in the gateway's error body; etcd answers a missing lease with it (ErrGRPCLeaseNotFound).
GRPC_NOT_FOUND = 5

_TxnRequests = list[dict[str, Any]]  # the class's `list` method hides the builtin from mypy there


class EtcdRefused(DatastoreError):
    """etcd answered, and refused: its HTTP status and gRPC code say what it refused, the text says it to people."""

    def __init__(self, message: str, http_status: int, grpc_code: int | None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code  # None when the body was not the gateway's {"error", "message", "code"}


def _grpc_code(body: bytes) -> int | None:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    create_revision: int = 0


@dataclass(frozen=True)
class KeyEvent:
    kind: str  # "put" or "delete"
    key: str
    value: bytes  # for a delete, the value before it (empty if etcd no longer had it)
    mod_revision: int
    create_revision: int = 0  # equal to mod_revision when the put created the key


@dataclass(frozen=True)
class PutOp:
    """Put `key` in a transaction; with `expected_revision`, only if its mod_revision is that
    (0: only if the key does not exist)."""

    key: str
    value: bytes
    expected_revision: int | None = None
    lease: int = 0


@dataclass(frozen=True)
class DeleteOp:
    """Delete `key` (every key under it when `prefix`); with `expected_revision`, only if the
    key is still at that mod_revision."""

    key: str
    expected_revision: int | None = None
    prefix: bool = False


@dataclass(frozen=True)
class UnchangedOp:
    """Write nothing; the transaction goes through only if the key (every key under it when
    `prefix`) was not created or changed after `revision`. A single key must still be at
    `revision` exactly (0: must not exist); under a prefix, deletions are not seen."""

    key: str
    revision: int
    prefix: bool = False


TxnOp = PutOp | DeleteOp | UnchangedOp


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


class _Gateway:
    """Keep-alive HTTP connections to one etcd, shared by the agent's threads (a small pool)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def connect(self, timeout: float | None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self.connect(self.timeout)
            try:
                conn.request("POST", f"/v3/{path}", body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise
            with self._lock:
                if len(self._idle) < 8:
                    self._idle.append(conn)
                else:
                    conn.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


class EtcdWatch:
    """A watch stream on a prefix, read by a thread and handed over through a queue."""

    def __init__(self, store: EtcdClient, prefix: str, start_revision: int) -> None:
        self._queue: queue.Queue[KeyEvent | BaseException | None] = queue.Queue()
        self._cancelled = threading.Event()
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _range_end(prefix),
                "start_revision": start_revision,
                "prev_kv": True,  # a delete then says what was deleted
            }
        }
        self._conn = store.gateway.connect(timeout=5)
        try:
            self._conn.request("POST", "/v3/watch", body=json.dumps(body).encode())
            self._response = self._conn.getresponse()
            if self._response.status != 200:
                raise DatastoreError(f"etcd refused the watch: HTTP {self._response.status}")
            self._conn.sock.settimeout(None)  # a quiet stream is not an error
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise store.unreachable(exc) from exc
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {prefix}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._cancelled.is_set():
                line = self._response.readline()
                if not line:
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
                    deleted = event.get("type") == "DELETE"
                    value = (event.get("prev_kv") or {}).get("value") if deleted else kv.get("value")
                    self._queue.put(
                        KeyEvent(
                            kind="delete" if deleted else "put",
                            key=_unb64(kv["key"]).decode(),
                            value=_unb64(value),
                            mod_revision=int(kv.get("mod_revision", 0)),
                            create_revision=int(kv.get("create_revision", 0)),
                        )
                    )
            if not self._cancelled.is_set():
                raise DatastoreError("etcd closed the watch stream")
        except BaseException as exc:
            if not self._cancelled.is_set():
                self._queue.put(exc if isinstance(exc, DatastoreError) else DatastoreError(f"etcd watch: {exc}"))
        finally:
            self._queue.put(None)

    def get(self, timeout: float) -> KeyEvent | None:
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
        """Stop the stream: shut the socket down so the reader sees the end and exits."""
        self._cancelled.set()
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._conn.close()


class EtcdClient:
    """etcd v3 through its JSON gateway. `endpoint` is a URL such as http://127.0.0.1:2379."""

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise DatastoreError(f"datastore URL {endpoint!r} is not an etcd URL such as http://127.0.0.1:2379")
        self.endpoint = endpoint
        self.gateway = _Gateway(parts.hostname, parts.port or 2379, timeout)
        self._reachability = ReachabilityTracker()

    @property
    def reachability(self) -> Reachability:
        return self._reachability.state

    def unreachable(self, exc: BaseException) -> DatastoreError:
        """Record a call that got no answer; the error to raise for it."""
        error = DatastoreError(f"etcd at {self.endpoint} is unreachable: {exc or type(exc).__name__}")
        if self._reachability.failed(str(error)):
            log.warning("the datastore stopped answering", extra={"error": str(error)})
        return error

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            status, data = self.gateway.post(path, body)
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(exc) from exc
        ended = self._reachability.succeeded()
        if ended is not None:
            log.warning("the datastore answers again", extra={"outage_s": round(time.time() - ended.since, 1)})
        if status != 200:
            raise EtcdRefused(
                f"etcd at {self.endpoint} refused {path}: HTTP {status} {data.decode(errors='replace').strip()}",
                http_status=status,
                grpc_code=_grpc_code(data),
            )
        out: dict[str, Any] = json.loads(data)
        return out

    @staticmethod
    def _kv(raw: dict[str, Any]) -> KeyValue:
        return KeyValue(
            key=_unb64(raw["key"]).decode(),
            value=_unb64(raw.get("value")),
            mod_revision=int(raw.get("mod_revision", 0)),
            lease=int(raw.get("lease", 0)),
            create_revision=int(raw.get("create_revision", 0)),
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

    def _txn(self, compare: _TxnRequests, success: _TxnRequests) -> int | None:
        """The revision after the transaction, or None if a comparison failed."""
        resp = self._post("kv/txn", {"compare": compare, "success": success, "failure": []})
        return int(resp["header"]["revision"]) if resp.get("succeeded", False) else None

    @staticmethod
    def _put_op(key: str, value: bytes, lease: int) -> dict[str, Any]:
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        return {"request_put": put}

    def create(self, key: str, value: bytes, lease: int = 0) -> int | None:
        """Put the key only if it does not exist; the new revision, or None if it existed."""
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}]
        return self._txn(compare, [self._put_op(key, value, lease)])

    def update(self, key: str, value: bytes, expected_revision: int | None, lease: int = 0) -> int | None:
        """Put only if the key is still at `expected_revision` (None: only if it exists at all);
        the new revision, or None if it is not."""
        if expected_revision is None:
            compare = [{"key": _b64(key), "result": "GREATER", "target": "CREATE", "create_revision": 0}]
        else:
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
        return self._txn(compare, [{"request_delete_range": {"key": _b64(key)}}]) is not None

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
                success.append({"request_delete_range": {"key": _b64(op.key), "range_end": _range_end(op.key)}})
            else:
                success.append({"request_delete_range": {"key": _b64(op.key)}})
        if len(compare) > MAX_TXN_OPS or len(success) > MAX_TXN_OPS:
            raise DatastoreError(
                f"one etcd transaction may hold at most {MAX_TXN_OPS} writes and {MAX_TXN_OPS} conditions; "
                f"this one has {len(success)} and {len(compare)}: split the change"
            )
        txn = {"compare": compare, "success": success, "failure": []}
        resp = self._post("kv/txn", txn)
        if not resp.get("succeeded", False):
            return None
        return int(resp["header"]["revision"])

    def grant_lease(self, ttl_seconds: int) -> int:
        return int(self._post("lease/grant", {"TTL": ttl_seconds, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The remaining TTL, or -1 if the lease expired (etcd then answers without a TTL)."""
        return int(self._post("lease/keepalive", {"ID": lease}).get("result", {}).get("TTL", -1))

    def revoke_lease(self, lease: int) -> None:
        try:
            self._post("kv/lease/revoke", {"ID": lease})
        except EtcdRefused as exc:
            if exc.grpc_code != GRPC_NOT_FOUND:  # a lease that expired already is as good as revoked
                raise

    def lease_ttl(self, lease: int) -> int:
        """The lease's remaining TTL in seconds, or -1 if it does not exist (expired or revoked)."""
        return int(self._post("kv/lease/timetolive", {"ID": lease}).get("TTL", -1))

    def close(self) -> None:
        self.gateway.close()
