"""The agent's local API: one JSON request and one JSON answer per connection on a unix socket
(the CNI plugin's requests, and `tulle status`'s)."""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Dispatch = Callable[[dict[str, Any]], dict[str, Any]]


class _Handler(socketserver.StreamRequestHandler):
    server: ApiServer

    def handle(self) -> None:
        data = self.rfile.read()
        try:
            request = json.loads(data)
        except ValueError:
            answer: dict[str, Any] = {"error": {"code": 6, "msg": "the agent could not decode the request"}}
        else:
            answer = self.server.dispatch(request)
        self.wfile.write(json.dumps(answer).encode())


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # socketserver's default queue of 5 refuses a runtime's burst of parallel CNI calls with EAGAIN.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, path: str, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        super().__init__(path, _Handler)


def serve(path: str, dispatch: Dispatch) -> ApiServer:
    """Listen on `path` (replacing a stale socket) in a thread; root only (0600)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = ApiServer(path, dispatch)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("ready", extra={"socket": path})
    return server
