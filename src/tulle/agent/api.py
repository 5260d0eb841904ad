"""The agent's local API: one JSON request and one JSON answer per connection on a unix socket
(the CNI plugin's requests, and `tulle status`'s).

Invariants (tests/unit/test_agent_surfaces.py, tests/fuzz/fuzz_agent_api.py):
- the socket is root's alone (0600) from the moment it exists: it is bound in a private 0700
  directory with its mode set before bind, then renamed into place;
- every request gets a JSON answer, whatever the bytes: the request that is not a JSON object, too
  large, too slow to arrive, or that makes the dispatch fail is answered with a CNI error object.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from tulle.cni import spec
from tulle.cni.files import check_private_dir, make_private_dir

log = logging.getLogger(__name__)

Dispatch = Callable[[dict[str, Any]], dict[str, Any]]

# A GC's list of valid attachments is the largest request: ~100 bytes an attachment.
MAX_REQUEST_BYTES = 16 << 20
# A client that neither sends its request nor closes its side would hold a thread for ever.
REQUEST_TIMEOUT_S = 120.0


def _error(code: int, msg: str, details: str = "") -> dict[str, Any]:
    return {"error": spec.CniError(code, msg, details).to_dict()}


def decode_request(data: bytes) -> dict[str, Any]:
    """The request in `data`, a JSON object; raises CniError 6 for anything else.

    >>> decode_request(b'{"command": "STATUS"}')
    {'command': 'STATUS'}
    >>> decode_request(b"[1]")
    Traceback (most recent call last):
    ...
    tulle.cni.spec.CniError: the agent's request must be a JSON object, not list
    """
    if len(data) > MAX_REQUEST_BYTES:
        raise spec.CniError(spec.ERR_DECODE, f"the agent's request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise spec.CniError(spec.ERR_DECODE, "the agent could not decode the request", str(exc)[:200]) from None
    if not isinstance(request, dict):
        raise spec.CniError(spec.ERR_DECODE, f"the agent's request must be a JSON object, not {type(request).__name__}")
    return request


def answer_request(data: bytes, dispatch: Dispatch) -> bytes:
    """The answer to the bytes of one request, as bytes of JSON; never raises (but for a bug in
    `json` itself): whatever goes wrong is the CNI error object a plugin passes on."""
    try:
        answer = dispatch(decode_request(data))
    except spec.CniError as exc:
        answer = {"error": exc.to_dict()}
    except Exception as exc:
        log.exception("an API request failed")
        answer = _error(spec.ERR_INTERNAL, f"the tulle agent failed: {exc!r}"[:1000])
    try:
        return json.dumps(answer).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        log.error("an API answer is not JSON", extra={"error": str(exc)})
        return json.dumps(_error(spec.ERR_INTERNAL, "the tulle agent's answer could not be encoded")).encode()


class _Handler(socketserver.StreamRequestHandler):
    server: ApiServer
    timeout = REQUEST_TIMEOUT_S  # set on the connection by StreamRequestHandler.setup

    def handle(self) -> None:
        try:
            data = self.rfile.read(MAX_REQUEST_BYTES + 1)
        except TimeoutError:
            answer = json.dumps(_error(spec.ERR_DECODE, f"no whole request within {REQUEST_TIMEOUT_S:g} s"))
            self._send(answer.encode())
            return
        except OSError:
            return  # the client is gone: there is no one to answer
        self._send(answer_request(data, self.server.dispatch))

    def _send(self, answer: bytes) -> None:
        try:
            self.wfile.write(answer)
        except OSError:
            pass  # the client gave up (timed out, killed): its retry gets the answer again


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # socketserver's default queue of 5 refuses a runtime's burst of parallel CNI calls with EAGAIN.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, path: str, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        """Bind so that the socket is 0600 from the moment anyone can reach it: its mode is set
        before bind (Linux gives the new file the socket's mode), it is bound in a new 0700
        directory beside its path and then renamed over that path, which also replaces a stale
        socket without a moment where the path is missing."""
        path = str(self.server_address)
        private = tempfile.mkdtemp(prefix=".s", dir=os.path.dirname(path))  # 0700
        staged = os.path.join(private, "s")
        try:
            os.fchmod(self.socket.fileno(), 0o600)
            self.socket.bind(staged)
            mode = os.stat(staged).st_mode & 0o777
            if mode != 0o600:  # a kernel that ignored fchmod: still unreachable, so fixed here
                os.chmod(staged, 0o600)
            os.rename(staged, path)
        finally:
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass
            os.rmdir(private)
        self.server_address = path


def prepare_socket_dir(path: str) -> None:
    """The socket's directory: made 0700 if missing; refused (UnsafePermissions) if group or
    others may write in it, as they could put their own socket in the agent's place. Others may
    look in (the lab's node directories are 0755): the socket itself is 0600."""
    folder = os.path.dirname(path) or "."
    make_private_dir(folder)
    check_private_dir(folder, "the agent socket's directory", allow=0o055)


def serve(path: str, dispatch: Dispatch) -> ApiServer:
    """Listen on `path` (replacing a stale socket) in a thread; root only (0600) from the start."""
    prepare_socket_dir(path)
    server = ApiServer(path, dispatch)
    threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
    log.info("ready", extra={"socket": path})
    return server
