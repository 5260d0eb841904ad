"""A small Kubernetes API client on the standard library (as etcd_client.py is for etcd): JSON
requests over keep-alive HTTPS connections, one per thread, and watch streams read line by line.
Only the datastore's Kubernetes backend uses it; every transport failure is DatastoreError."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from tulle.datastore.base import CredentialsError, DatastoreError
from tulle.datastore.kubeconfig import KubeCredentials, remove_temporary


class ApiStatus(Exception):
    """The API server answered with an error status (409, 404, 422, ...)."""

    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code = code
        self.body = body
        self.reason = str(body.get("reason", ""))
        super().__init__(str(body.get("message") or f"HTTP {code}"))


def _context(credentials: KubeCredentials) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=credentials.ca)
        if credentials.cert and credentials.key:
            context.load_cert_chain(credentials.cert, credentials.key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"kubeconfig {credentials.source}: cannot load its TLS files: {exc}") from None
    return context


class KubeClient:
    def __init__(self, credentials: KubeCredentials, timeout: float = 5.0) -> None:
        parts = urlsplit(credentials.server)
        self.credentials = credentials
        self.host = parts.hostname or ""
        self.port = parts.port or 443
        self.timeout = timeout
        try:
            self.context = _context(credentials)
        finally:
            remove_temporary(credentials)
        self._local = threading.local()
        self._headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if credentials.token:
            self._headers["Authorization"] = f"Bearer {credentials.token}"

    def connect(self, timeout: float | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout if timeout is None else timeout, context=self.context
        )

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The decoded answer; ApiStatus for an error status, DatastoreError when there is none.
        A reused connection that the server closed is tried once more on a new one."""
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = self.connect()
            try:
                conn.request(method, path, body=payload, headers=self._headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if fresh or attempt == 1 or isinstance(exc, socket.timeout):
                    raise DatastoreError(f"Kubernetes API {self.credentials.server}: {exc}") from None
                continue
            try:
                decoded: dict[str, Any] = json.loads(raw) if raw else {}
            except ValueError:
                decoded = {"message": raw[:200].decode(errors="replace")}
            if response.status == 401:
                raise CredentialsError(
                    f"kubeconfig {self.credentials.source}: the API server refused its credential (401)"
                )
            if response.status >= 400:
                raise ApiStatus(response.status, decoded)
            return decoded
        raise AssertionError("unreachable")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
