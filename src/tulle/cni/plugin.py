"""The `tulle` CNI plugin: a thin client of the node agent.

The runtime runs this executable once per command (CNI spec 1.1.0, section 2). It checks
what the spec lets it check without the agent (environment, configuration, versions),
then hands the request to the node agent over a unix socket and prints the agent's answer.
Standard library only and started with `/usr/bin/python3 -S`, so that a start costs ~15 ms;
for the same reason it speaks JSON through `quickjson` and unix sockets through `_socket`
rather than the `json` and `socket` packages, whose imports would double that.
"""

from __future__ import annotations

import _socket
import os
import stat  # os imports it: free at start
import sys

from tulle.cni import quickjson, spec
from tulle.cni.spec import CniError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2.5 ms at start; the plugin does not need it at run time
    from typing import Any

DEFAULT_SOCKET = "/run/tulle/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/tulle"
# Where a CNI configuration may point the plugin's socket and state: the defaults' directories,
# root's alone. A configuration is data a cluster's users may get to shape (a Multus
# NetworkAttachmentDefinition, a conflist templated by an operator); the plugin runs as root, so
# a path elsewhere would make it write a pending DEL into any directory or hand a pod's request to
# any socket. Only the runtime's environment (PATH_ROOTS_ENV, colon-separated) adds directories:
# neither a pod nor a configuration can set it.
DEFAULT_PATH_ROOTS = ("/run/tulle", "/var/lib/tulle")
PATH_ROOTS_ENV = "TULLE_CNI_PATH_ROOTS"
PATH_FIELDS = ("agentSocket", "stateDir")
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL
# ADD waits this long for the agent; a runtime retries after error 11.
AGENT_TIMEOUT_S = 60.0


class AgentUnavailable(Exception):
    """The agent could not serve this request: not there, gone mid-request, too slow, or talking
    nonsense. Each is a condition a retry may clear, so the runtime is told to try again."""


class UntrustedAgent(AgentUnavailable):
    """The socket, or the process listening on it, is not root's: nothing is sent to it (a pod's
    request names the pod; the answer would give it addresses). The runtime tries again, as for
    an agent that is not there, so a DEL is kept for the real agent."""


def _os_error_text(exc: OSError) -> str:
    # A socket timeout is TimeoutError("timed out") without a strerror.
    return exc.strerror or str(exc) or type(exc).__name__


def _config_version(config: Any) -> str:
    if isinstance(config, dict) and config.get("cniVersion") in spec.SUPPORTED_VERSIONS:
        return str(config["cniVersion"])
    return spec.SPEC_VERSION


def _required_env(env: dict[str, str], command: str) -> dict[str, Any]:
    """Spec section 2: which variables each command needs."""
    req: dict[str, Any] = {"command": command, "path": env.get("CNI_PATH", "")}
    for name in ("CNI_PATH", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
        # A real environment cannot hold NUL (execve); a value that does was not made by a runtime.
        if "\0" in env.get(name, ""):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"{name} contains a NUL byte")
    if command in ("ADD", "DEL", "CHECK"):
        container_id = env.get("CNI_CONTAINERID", "")
        spec.validate_container_id(container_id)
        ifname = env.get("CNI_IFNAME", "")
        spec.validate_ifname(ifname)
        netns = env.get("CNI_NETNS", "")
        # DEL may come without a netns (spec: "When CNI_NETNS ... not provided, clean up").
        if command != "DEL" and not netns:
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_NETNS is required for {command}")
        if netns and (problem := spec.path_problem(netns)):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_NETNS {spec.shown(netns)} is not valid: {problem}")
        req.update(containerID=container_id, ifname=ifname, netns=netns)
        req["args"] = spec.parse_cni_args(env.get("CNI_ARGS", ""))
    if not req["path"] and command != "DEL":
        raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_PATH is required for {command}")
    return req


def _decode_config(raw: bytes) -> dict[str, Any]:
    try:
        config = quickjson.loads(raw)
    except ValueError as exc:
        raise CniError(spec.ERR_DECODE, "network configuration on stdin is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(spec.ERR_DECODE, "network configuration on stdin must be a JSON object")
    return config


def path_roots(env: dict[str, str]) -> tuple[str, ...]:
    """The directories a configuration's paths may be in: the defaults', and the runtime's PATH_ROOTS_ENV."""
    extra = [root for root in env.get(PATH_ROOTS_ENV, "").split(":") if root]
    for root in extra:
        if problem := spec.path_problem(root):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"{PATH_ROOTS_ENV} lists {spec.shown(root)}: {problem}")
    return (*DEFAULT_PATH_ROOTS, *extra)


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def _validate_path_field(config: dict[str, Any], field: str, roots: tuple[str, ...]) -> None:
    value = config[field]
    if not isinstance(value, str):
        problem = "it is not a string"
    else:
        problem = spec.path_problem(value, SOCKET_PATH_MAX if field == "agentSocket" else spec.PATH_MAX)
        if not problem and not any(_under(value, root) for root in roots):
            problem = f"it is outside {', '.join(roots)} (the runtime's {PATH_ROOTS_ENV} adds directories)"
    if problem:
        raise CniError(
            spec.ERR_INVALID_CONFIG,
            f"{field!r} must be an absolute, normalized path under {', '.join(roots)}",
            f"field: {field}; {problem}",
        )


def _validate_config(config: dict[str, Any], env: dict[str, str]) -> None:
    for field in ("name", "type"):
        value = config.get(field)
        if not isinstance(value, str) or not value:
            raise CniError(spec.ERR_INVALID_CONFIG, f"network configuration has no {field!r}", f"field: {field}")
        spec.validate_config_name(field, value)
    if any(field in config for field in PATH_FIELDS):
        roots = path_roots(env)
        for field in PATH_FIELDS:
            if field in config:
                _validate_path_field(config, field, roots)
    if "mtu" in config and not (isinstance(config["mtu"], int) and 576 <= config["mtu"] <= 65535):
        raise CniError(spec.ERR_INVALID_CONFIG, "'mtu' must be a whole number from 576 to 65535", "field: mtu")


def _trusted_uids() -> tuple[int, ...]:
    # Root, and whoever runs the plugin: as root (always, under a runtime) that is root alone; a
    # plugin run by another user (the unit tests without root) trusts no one but itself and root.
    return (0, os.geteuid())


def _check_socket_file(socket_path: str) -> None:
    """Before anything is sent: the path is a socket, and root's (a socket elsewhere may belong to
    anyone who could write in its directory)."""
    try:
        st = os.stat(socket_path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in a path given by a caller other than run()
        text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        raise AgentUnavailable(f"cannot connect to the tulle agent at {socket_path}: {text}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UntrustedAgent(f"{socket_path} is not a socket: the plugin does not connect to it")
    if st.st_uid not in _trusted_uids():
        raise UntrustedAgent(
            f"the socket {socket_path} is owned by uid {st.st_uid}, not by root: the plugin does not connect to it"
        )


def _check_peer(sock: _socket.socket, socket_path: str) -> None:
    """The process that accepted is root's: the socket file may have been swapped since it was checked."""
    try:
        # struct ucred: pid, uid, gid, each 32 bits in the machine's byte order.
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except OSError as exc:
        raise AgentUnavailable(f"cannot ask who listens on {socket_path}: {_os_error_text(exc)}") from None
    uid = int.from_bytes(cred[4:8], sys.byteorder)
    if uid not in _trusted_uids():
        raise UntrustedAgent(
            f"the process listening on {socket_path} runs as uid {uid}, not as root: the plugin sends it nothing"
        )


def _connect(sock: _socket.socket, socket_path: str, timeout: float) -> None:
    # A full listen queue answers EAGAIN at once (a socket with a timeout is non-blocking inside), which
    # means "busy", not "down": a burst of ADDs from a node's runtime must wait its turn, not fail.
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(socket_path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"the tulle agent at {socket_path} is too busy to take a connection") from None
            time.sleep(0.005)
        except OSError as exc:
            raise AgentUnavailable(
                f"cannot connect to the tulle agent at {socket_path}: {_os_error_text(exc)}"
            ) from None


def call_agent(socket_path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request, one answer (a JSON object), over the agent's unix socket, which must be root's.

    Any failure on the way (refused, reset, broken pipe, timeout, an answer that is not a JSON
    object) is AgentUnavailable, never an OSError or ValueError: the agent may die or restart
    at any point of a request, and the plugin must answer the runtime all the same.
    """
    _check_socket_file(socket_path)
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError as exc:  # e.g. out of file descriptors: transient as well
        raise AgentUnavailable(
            f"cannot open a socket to the tulle agent at {socket_path}: {_os_error_text(exc)}"
        ) from None
    try:
        sock.settimeout(timeout)
        _connect(sock, socket_path, timeout)
        _check_peer(sock, socket_path)
        raw = _exchange(sock, socket_path, quickjson.dumps(request).encode(), timeout)
    finally:
        sock.close()
    if not raw:
        raise AgentUnavailable(f"the tulle agent at {socket_path} closed the connection without an answer")
    try:
        answer = quickjson.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise AgentUnavailable(
            f"the tulle agent at {socket_path} answered with something that is not JSON: {exc}"
        ) from None
    if not isinstance(answer, dict):
        raise AgentUnavailable(f"the tulle agent at {socket_path} answered with JSON that is not an object")
    return answer


def _exchange(sock: _socket.socket, socket_path: str, request: bytes, timeout: float) -> bytes:
    """Send the request, then read the answer until the agent closes its side."""
    sent = False
    try:
        sock.sendall(request)
        sock.shutdown(_socket.SHUT_WR)
        sent = True
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        what = "answer" if sent else "take the request"
        raise AgentUnavailable(f"the tulle agent at {socket_path} did not {what} within {timeout:g} s") from None
    except OSError as exc:  # ConnectionResetError, BrokenPipeError, ...: the agent went away mid-request
        step = "waiting for the answer" if sent else "sending the request"
        raise AgentUnavailable(
            f"the connection to the tulle agent at {socket_path} failed while {step}: {_os_error_text(exc)}"
        ) from None
    return b"".join(chunks)


def _answer_shape_problem(command: str, answer: dict[str, Any]) -> str:
    """What makes the agent's answer to `command` unusable, or "" if nothing does.

    The answer is {"error": <CNI error object>} or {"result": ...}. The error object's `code`
    is required and `msg`/`details` are strings (spec section "Error"); ADD's result is the
    spec's Success object ("ADD Success"), read by `spec.convert_result`, so the fields it
    reads must have the types it expects. The other commands have no result to print.
    """
    if "error" in answer:
        error = answer["error"]
        if not isinstance(error, dict):
            return "its error is not an object"
        code = error.get("code")
        if not isinstance(code, int) or isinstance(code, bool) or code < 1:
            return "its error has no valid code"
        if not all(isinstance(error.get(field, ""), str) for field in ("msg", "details")):
            return "its error's msg or details is not a string"
        return ""
    if "result" not in answer:
        return "it has neither a result nor an error"
    result = answer["result"]
    if command != "ADD":
        return "" if result is None or isinstance(result, dict) else "its result is neither null nor an object"
    if not isinstance(result, dict):
        return "its result is not an object"
    for field in ("interfaces", "ips", "routes"):
        entries = result.get(field, [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            return f"its result's {field} is not a list of objects"
    if not all(isinstance(ip.get("address"), str) for ip in result.get("ips", [])):
        return "an entry of its result's ips has no address"
    if not isinstance(result.get("dns", {}), dict):
        return "its result's dns is not an object"
    return ""


def record_pending_del(state_dir: str, request: dict[str, Any]) -> str:
    """Keep a DEL the agent could not take, so that the agent carries it out when it starts."""
    import hashlib  # the rare path: keep its ~4 ms out of every start
    import json
    import time

    from tulle.cni.files import make_private_dir, write_atomically

    folder = os.path.join(state_dir, "pending-del")
    # The state directory too: made here first (the agent may never have run), it is the agent's
    # from then on, which refuses to start on one that others may read.
    make_private_dir(folder)
    key = f"{request['config'].get('name', '')}/{request['containerID']}/{request['ifname']}"
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    write_atomically(path, json.dumps(dict(request, recorded=time.time())).encode())
    return path


def _keep_del_for_the_agent(state_dir: str, request: dict[str, Any], agent_failure: AgentUnavailable) -> None:
    """Record a DEL the agent could not take, or fail it so that the runtime sends it again.

    Spec section "DEL": plugins "should generally complete a DEL action without error", which a
    recorded DEL does: the agent carries it out when it is back. A DEL neither delivered nor
    recorded would be lost (its addresses and interfaces leaked), so it fails with 11 ("try
    again later", section "Error"), which makes the runtime send it again.
    """
    try:
        record_pending_del(state_dir, request)
    except OSError as exc:
        folder = os.path.join(state_dir, "pending-del")
        raise CniError(
            spec.ERR_TRY_AGAIN_LATER,
            f"the tulle agent is not available and the DEL cannot be recorded in {folder}: {_os_error_text(exc)}",
            str(agent_failure),
        ) from None


def run(command: str, env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """Carry out one CNI command; return (exit status, JSON to print or None)."""
    config: dict[str, Any] = {}
    try:
        if command == "VERSION":
            # The input is optional and only names the version the runtime speaks.
            version = spec.SPEC_VERSION
            if stdin.strip():
                requested = _decode_config(stdin).get("cniVersion")
                if requested in spec.SUPPORTED_VERSIONS:
                    version = str(requested)
            return 0, {"cniVersion": version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
        if command not in spec.COMMANDS:
            raise CniError(
                spec.ERR_INVALID_ENVIRONMENT,
                f"CNI_COMMAND {spec.shown(command)} is not a CNI command" if command else "CNI_COMMAND is not set",
                f"expected one of {', '.join(spec.COMMANDS)}",
            )
        config = _decode_config(stdin)
        version = spec.check_version(config.get("cniVersion"), command)
        _validate_config(config, env)
        request = _required_env(env, command)
        request["config"] = config
        socket_path = str(config.get("agentSocket", DEFAULT_SOCKET))
        try:
            answer = call_agent(socket_path, request, AGENT_TIMEOUT_S)
            problem = _answer_shape_problem(command, answer)
            if problem:
                raise AgentUnavailable(
                    f"the tulle agent at {socket_path} answered {command} with JSON of the wrong shape: {problem}"
                )
        except AgentUnavailable as exc:
            if command == "DEL":
                _keep_del_for_the_agent(str(config.get("stateDir", DEFAULT_STATE_DIR)), request, exc)
                return 0, None
            if command == "STATUS":
                # Spec section "STATUS": 50, "the plugin is not available (cannot service ADD requests)".
                raise CniError(spec.ERR_PLUGIN_NOT_AVAILABLE, "the tulle agent is not available", str(exc)) from None
            # Spec section "Error": 11, "try again later", for a transient condition; the runtime retries.
            raise CniError(
                spec.ERR_TRY_AGAIN_LATER, "the tulle agent is not available; try again later", str(exc)
            ) from None
        if "error" in answer:
            raise CniError.from_dict(answer["error"])
        if command == "ADD":
            return 0, spec.convert_result(answer["result"], version)
        return 0, None
    except CniError as exc:
        return 1, exc.to_dict(_config_version(config))


def main() -> None:
    stdin = b""
    try:
        command = os.environ.get("CNI_COMMAND", "")
        stdin = sys.stdin.buffer.read()
        status, output = run(command, dict(os.environ), stdin)
        if output is not None:
            sys.stdout.write(quickjson.dumps(output))
            sys.stdout.flush()
    except SystemExit:
        raise
    except BaseException as exc:
        # The last resort, for a bug: a traceback is no answer to a runtime (spec section "Error":
        # a failing plugin prints an error object on stdout and exits non-zero).
        status = 1
        _print_plugin_failure(exc, stdin)
    sys.exit(status)


def _print_plugin_failure(exc: BaseException, stdin: bytes) -> None:
    """Print error 102 for an exception the plugin did not expect; where it was raised goes in details."""
    try:
        version = _config_version(quickjson.loads(stdin))
    except Exception:
        version = spec.SPEC_VERSION
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = (
        f"in {frame.tb_frame.f_code.co_name} at {frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else ""
    )
    error = CniError(spec.ERR_INTERNAL, f"the tulle plugin failed: {exc!r}", where)
    try:
        sys.stdout.write(quickjson.dumps(error.to_dict(version)))
        sys.stdout.flush()
    except Exception:
        pass  # stdout itself is gone: the exit status is all the runtime can get


if __name__ == "__main__":
    main()
