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

Authentication: `https://` with a client certificate (the CA bundle verifies etcd, etcd verifies
the certificate; `tulle.datastore.tls` follows the files as they are replaced), and, where etcd's
RBAC is on, a user: the gateway cannot take the user from the certificate (etcd 3.4 refuses a
certificate with a Common Name on the gateway once auth is enabled), so the client logs in with a
password and sends the token etcd gives it with every call, logging in again when etcd says the
token is no longer valid (it expired, etcd restarted, or the password changed).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tulle.datastore.base import (
    CredentialsError,
    DatastoreError,
    Login,
    Reachability,
    ReachabilityTracker,
    TlsFiles,
    WatchExpired,
)
from tulle.datastore.tls import ClientTls, describe_handshake_failure

log = logging.getLogger(__name__)

# etcd's --max-txn-ops default: a transaction may hold at most this many compares and this
# many writes; etcd answers a bigger one with a bare "Bad Request".
MAX_TXN_OPS = 128

# google.rpc.Code in the gateway's error body; etcd answers a missing lease with it (ErrGRPCLeaseNotFound).
GRPC_NOT_FOUND = 5
# What etcd's gateway answers a token it no longer knows (ErrGRPCInvalidAuthToken, UNAUTHENTICATED).
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
# etcd's own words for a client certificate with a Common Name on the gateway while auth is on
# (embed/serve.go), and for a call without a user while auth is on.
# With an Accept header the gateway marks its call to etcd as a gateway call, and etcd then never
# takes the user from the TLS connection the gateway made, which carries etcd's own server
# certificate (etcd 3.4, auth/store.go: AuthInfoFromTLS); without one, a call with no token runs
# as the user named by the server certificate's Common Name (docs/deployment.md).
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_GATEWAY_REFUSES_CN = "CommonName of client sending a request against gateway"
_NO_USER = "user name is empty"
_AUTH_FAILED = "authentication failed"

_TxnRequests = list[dict[str, Any]]  # the class's `list` method hides the builtin from mypy there


class EtcdRefused(DatastoreError):
    """etcd answered, and refused: its HTTP status and gRPC code say what it refused, the text says it to people."""

    def __init__(self, message: str, http_status: int, grpc_code: int | None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code  # None when the body was not the gateway's {"error", "message", "code"}


def _error_text(body: bytes) -> str:
    """The gateway's error message ({"error": ..., "message": ..., "code": ...}), or the body."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else body.decode(errors="replace").strip()


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


@dataclass(frozen=True)
class Grant:
    """A permission of an etcd role: READ, WRITE or READWRITE on a key (every key under it when `prefix`)."""

    access: str
    key: str
    prefix: bool = False


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
    """Keep-alive HTTP(S) connections to one etcd, shared by the agent's threads (a small pool).

    With TLS, every call first asks `tls` for the current context (a stat of its files), so that
    replaced files are taken up at once; a pooled connection made with an older context is
    closed rather than used again, so that new certificates are the ones presented."""

    def __init__(self, host: str, port: int, timeout: float, tls: ClientTls | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self._idle: list[tuple[int, http.client.HTTPConnection]] = []  # (TLS generation, connection)
        self._lock = threading.Lock()

    def _context(self) -> tuple[int, ssl.SSLContext | None]:
        if self.tls is None:
            return 0, None
        context = self.tls.context()
        return self.tls.generation, context

    def connect(self, timeout: float | None) -> http.client.HTTPConnection:
        """A new connection (its TLS handshake happens with the first request)."""
        _, context = self._context()
        return self._new_connection(context, timeout)

    def _new_connection(self, context: ssl.SSLContext | None, timeout: float | None) -> http.client.HTTPConnection:
        if context is None:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)

    def _take(self, generation: int) -> http.client.HTTPConnection | None:
        with self._lock:
            while self._idle:
                made_with, conn = self._idle.pop()
                if made_with == generation:
                    return conn
                conn.close()  # made with certificates that have since been replaced
        return None

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        payload = json.dumps(body).encode()
        all_headers = {**_HEADERS, **(headers or {})}
        for attempt in (0, 1):
            generation, context = self._context()
            conn = self._take(generation)
            reused = conn is not None
            if conn is None:
                conn = self._new_connection(context, self.timeout)
            try:
                conn.request("POST", f"/v3/{path}", body=payload, headers=all_headers)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, ssl.SSLEOFError):
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise
            with self._lock:
                if len(self._idle) < 8:
                    self._idle.append((generation, conn))
                else:
                    conn.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for _, conn in self._idle:
                conn.close()
            self._idle.clear()


class _PasswordFile:
    """A password kept in a file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._password = ""

    def read(self) -> tuple[str, bool]:
        """The password, and whether it changed since the last read; CredentialsError if the
        file cannot be read or is empty."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return self._password, False
            with open(self.path) as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CredentialsError(f"datastore password file {self.path}: cannot be read ({reason})") from None
        if not password:
            raise CredentialsError(f"datastore password file {self.path}: is empty")
        self._stamp, self._password = stamp, password
        return password, True


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
        token = store.login_token()
        headers = {"Authorization": token} if token else {}
        try:
            self._conn = store.gateway.connect(timeout=5)
        except CredentialsError as exc:
            raise store.failed(exc) from None
        try:
            self._conn.request("POST", "/v3/watch", body=json.dumps(body).encode(), headers={**_HEADERS, **headers})
            self._response = self._conn.getresponse()
            if self._response.status != 200:
                raise store.refusal("watch", self._response.status, self._response.read())
            # etcd answers at once whether it created the watch; a refusal (a token etcd no
            # longer knows, no permission) is raised here, where the caller backs off.
            self._check_created(store, token, self._response.readline())
            self._conn.sock.settimeout(None)  # a quiet stream is not an error
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise store.unreachable(exc) from exc
        except BaseException:
            self._conn.close()
            raise
        self._thread = threading.Thread(target=self._read, name=f"etcd-watch {prefix}", daemon=True)
        self._thread.start()

    @staticmethod
    def _check_created(store: EtcdClient, token: str | None, line: bytes) -> None:
        if not line:
            raise DatastoreError("etcd closed the watch stream before creating the watch")
        try:
            result = json.loads(line).get("result", {})
        except (ValueError, AttributeError):
            raise DatastoreError(f"etcd answered the watch with {line[:200]!r}") from None
        if not result.get("canceled"):
            return
        reason = str(result.get("cancel_reason", "watch cancelled by etcd"))
        if "invalid auth token" in reason and token is not None:
            store.forget_token(token)  # the next call logs in again
        if "auth" in reason or "permission denied" in reason:
            raise EtcdRefused(f"etcd at {store.endpoint} refused the watch: {reason}", HTTP_FORBIDDEN, None)
        raise WatchExpired(reason)

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
    """etcd v3 through its JSON gateway. `endpoint` is a URL such as https://127.0.0.1:2379
    (with `tls`, the client's files) or, only where the caller accepted it, http://...;
    `login` is the etcd user to call as where etcd's RBAC is on."""

    def __init__(
        self, endpoint: str, timeout: float = 5.0, tls: TlsFiles | None = None, login: Login | None = None
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DatastoreError(f"datastore URL {endpoint!r} is not an etcd URL such as https://127.0.0.1:2379")
        if (parts.scheme == "https") != (tls is not None):
            raise DatastoreError(f"etcd at {endpoint}: https:// goes with TLS files, http:// without")
        self.endpoint = endpoint
        self.tls = ClientTls(tls) if tls is not None else None
        self.login = login
        self.gateway = _Gateway(parts.hostname, parts.port or 2379, timeout, self.tls)
        self._reachability = ReachabilityTracker()
        self._password = _PasswordFile(login.password_file) if login is not None else None
        self._token: str | None = None
        self._login_lock = threading.Lock()
        if self.tls is not None:
            self.tls.context()  # bad files are reported when the client is made, not at its first call

    @property
    def reachability(self) -> Reachability:
        return self._reachability.state

    def _record_failure(self, error: DatastoreError) -> DatastoreError:
        if self._reachability.failed(str(error)):
            log.warning("the datastore stopped answering", extra={"error": str(error)})
        return error

    def unreachable(self, exc: BaseException) -> DatastoreError:
        """Record a call that got no answer; the error to raise for it (a CredentialsError when
        the TLS handshake failed on this client's files)."""
        if isinstance(exc, ssl.SSLError) and self.tls is not None:
            said = describe_handshake_failure(exc, self.endpoint, self.tls.files)
            if said is not None:
                return self._record_failure(CredentialsError(said))
        return self._record_failure(
            DatastoreError(f"etcd at {self.endpoint} is unreachable: {exc or type(exc).__name__}")
        )

    def failed(self, error: CredentialsError) -> DatastoreError:
        """Record a call this client could not make with its credentials; the error to raise."""
        return self._record_failure(error)

    # -- logging in (etcd's RBAC) ------------------------------------------------------------

    def login_token(self) -> str | None:
        """The token to call with (None without a login): logs in when there is none yet or the
        password file changed. CredentialsError when etcd refuses the user and password."""
        if self.login is None or self._password is None:
            return None
        with self._login_lock:
            try:
                password, changed = self._password.read()
            except CredentialsError as exc:
                raise self.failed(exc) from None
            if self._token is None or changed:
                self._token = self._authenticate(self.login, password)
            return self._token

    def forget_token(self, token: str) -> None:
        """etcd no longer knows `token`: the next call logs in again (unless another has)."""
        with self._login_lock:
            if self._token == token:
                self._token = None

    def _authenticate(self, login: Login, password: str) -> str:
        status, data = self._send("auth/authenticate", {"name": login.user, "password": password}, None)
        if status == 200:
            return str(json.loads(data).get("token", ""))
        text = _error_text(data)
        if _AUTH_FAILED in text:
            raise self.failed(
                CredentialsError(
                    f"datastore password file {login.password_file}: etcd at {self.endpoint} refused it "
                    f"for user {login.user!r} ({text})"
                )
            )
        raise self.refusal("auth/authenticate", status, data)

    # -- calls ----------------------------------------------------------------------------------

    def _send(self, path: str, body: dict[str, Any], token: str | None) -> tuple[int, bytes]:
        """POST to the gateway: (HTTP status, body); transport failures are recorded and raised
        as DatastoreError. An answer is recorded by the caller, which knows whether it counts
        (a refused credential does not: the datastore is no more usable than an absent one)."""
        headers = {"Authorization": token} if token else None
        try:
            return self.gateway.post(path, body, headers)
        except CredentialsError as exc:
            raise self.failed(exc) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(exc) from exc

    def _answered(self) -> None:
        ended = self._reachability.succeeded()
        if ended is not None:
            log.warning("the datastore answers again", extra={"outage_s": round(time.time() - ended.since, 1)})

    def refusal(self, path: str, status: int, data: bytes) -> DatastoreError:
        """The error for an answer other than 200: what etcd refused, and why in words a user can act on."""
        text = _error_text(data)
        if _GATEWAY_REFUSES_CN in text and self.tls is not None:
            return self.failed(
                CredentialsError(
                    f"datastore client certificate {self.tls.files.cert}: has a Common Name, which etcd refuses "
                    "on its JSON gateway while RBAC is on; issue it without one (the user is --datastore-user)"
                )
            )
        if _NO_USER in text:
            return self.failed(
                CredentialsError(
                    f"etcd at {self.endpoint} has RBAC on and this client gave no user: "
                    "give --datastore-user and --datastore-password-file"
                )
            )
        self._answered()  # a refusal of what was asked is an answer, not an outage
        if status == HTTP_FORBIDDEN:
            user = f"user {self.login.user!r}" if self.login else "this client"
            return EtcdRefused(
                f"etcd at {self.endpoint} refused {path} to {user}: {text}",
                http_status=status,
                grpc_code=_grpc_code(data),
            )
        return EtcdRefused(
            f"etcd at {self.endpoint} refused {path}: HTTP {status} {text}",
            http_status=status,
            grpc_code=_grpc_code(data),
        )

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in (0, 1):
            token = self.login_token()
            status, data = self._send(path, body, token)
            if status == HTTP_UNAUTHORIZED and token is not None and attempt == 0:
                # The token expired, etcd restarted (simple tokens live in its memory) or the
                # password changed: log in again, once. etcd did not carry out the call.
                self.forget_token(token)
                continue
            break
        if status != 200:
            raise self.refusal(path, status, data)
        self._answered()
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

    # -- users and roles (etcd's RBAC), for whoever runs etcd --------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add the user, or give an existing one this password."""
        try:
            self._post("auth/user/add", {"name": name, "password": password})
        except EtcdRefused as exc:
            if "already exists" not in str(exc):
                raise
            self._post("auth/user/changepw", {"name": name, "password": password})

    def delete_user(self, name: str) -> None:
        try:
            self._post("auth/user/delete", {"name": name})
        except EtcdRefused as exc:
            if "not found" not in str(exc):
                raise

    def add_role(self, name: str, grants: Sequence[Grant]) -> None:
        """Add the role (if it is not there) and grant it each permission."""
        try:
            self._post("auth/role/add", {"name": name})
        except EtcdRefused as exc:
            if "already exists" not in str(exc):
                raise
        for grant in grants:
            perm: dict[str, Any] = {"permType": grant.access, "key": _b64(grant.key)}
            if grant.prefix:
                perm["range_end"] = _range_end(grant.key)
            self._post("auth/role/grant", {"name": name, "perm": perm})

    def delete_role(self, name: str) -> None:
        try:
            self._post("auth/role/delete", {"role": name})
        except EtcdRefused as exc:
            if "not found" not in str(exc):
                raise

    def grant_role(self, user: str, role: str) -> None:
        self._post("auth/user/grant", {"user": user, "role": role})

    def enable_auth(self) -> None:
        """Turn RBAC on (etcd wants a user `root` with the role `root` first)."""
        self._post("auth/enable", {})

    def close(self) -> None:
        self.gateway.close()
