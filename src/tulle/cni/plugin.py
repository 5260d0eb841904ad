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
import sys

from tulle.cni import quickjson, spec
from tulle.cni.spec import CniError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~2.5 ms at start; the plugin does not need it at run time
    from typing import Any

DEFAULT_SOCKET = "/run/tulle/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/tulle"
# ADD waits this long for the agent; a runtime retries after error 11.
AGENT_TIMEOUT_S = 60.0


class AgentUnavailable(Exception):
    pass


def _config_version(config: Any) -> str:
    if isinstance(config, dict) and config.get("cniVersion") in spec.SUPPORTED_VERSIONS:
        return str(config["cniVersion"])
    return spec.SPEC_VERSION


def _required_env(env: dict[str, str], command: str) -> dict[str, Any]:
    """Spec section 2: which variables each command needs."""
    req: dict[str, Any] = {"command": command, "path": env.get("CNI_PATH", "")}
    if command in ("ADD", "DEL", "CHECK"):
        container_id = env.get("CNI_CONTAINERID", "")
        spec.validate_container_id(container_id)
        ifname = env.get("CNI_IFNAME", "")
        spec.validate_ifname(ifname)
        netns = env.get("CNI_NETNS", "")
        # DEL may come without a netns (spec: "When CNI_NETNS ... not provided, clean up").
        if command != "DEL" and not netns:
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_NETNS is required for {command}")
        req.update(containerID=container_id, ifname=ifname, netns=netns)
        req["args"] = spec.parse_cni_args(env.get("CNI_ARGS", ""))
    if not req["path"] and command != "DEL":
        raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_PATH is required for {command}")
    return req


def _decode_config(raw: bytes) -> dict[str, Any]:
    try:
        config = quickjson.loads(raw)
    except ValueError as exc:
        raise CniError(spec.ERR_DECODE, "network configuration on stdin is not valid JSON", str(exc))
    if not isinstance(config, dict):
        raise CniError(spec.ERR_DECODE, "network configuration on stdin must be a JSON object")
    return config


def _validate_config(config: dict[str, Any]) -> None:
    for field in ("name", "type"):
        value = config.get(field)
        if not isinstance(value, str) or not value:
            raise CniError(spec.ERR_INVALID_CONFIG, f"network configuration has no {field!r}", f"field: {field}")
    for field in ("agentSocket", "stateDir"):
        if field in config and not (isinstance(config[field], str) and config[field].startswith("/")):
            raise CniError(spec.ERR_INVALID_CONFIG, f"{field!r} must be an absolute path", f"field: {field}")
    if "mtu" in config and not (isinstance(config["mtu"], int) and 576 <= config["mtu"] <= 65535):
        raise CniError(spec.ERR_INVALID_CONFIG, "'mtu' must be a whole number from 576 to 65535", "field: mtu")


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
                raise AgentUnavailable(f"the tulle agent at {socket_path} is too busy to take a connection")
            time.sleep(0.005)
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the tulle agent at {socket_path}: {exc.strerror}")


def call_agent(socket_path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request, one answer, over the agent's unix socket."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect(sock, socket_path, timeout)
        sock.sendall(quickjson.dumps(request).encode())
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AgentUnavailable(f"the tulle agent at {socket_path} did not answer within {timeout:.0f} s")
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    if not chunks:
        raise AgentUnavailable(f"the tulle agent at {socket_path} closed the connection without an answer")
    answer: dict[str, Any] = quickjson.loads(b"".join(chunks))
    return answer


def record_pending_del(state_dir: str, request: dict[str, Any]) -> str:
    """Keep a DEL the agent could not take, so that the agent carries it out when it starts."""
    import hashlib  # the rare path: keep its ~4 ms out of every start
    import json
    import time

    folder = os.path.join(state_dir, "pending-del")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key = f"{request['config'].get('name', '')}/{request['containerID']}/{request['ifname']}"
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(request, recorded=time.time()), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


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
                f"CNI_COMMAND {command!r} is not a CNI command" if command else "CNI_COMMAND is not set",
                f"expected one of {', '.join(spec.COMMANDS)}",
            )
        config = _decode_config(stdin)
        version = spec.check_version(config.get("cniVersion"), command)
        _validate_config(config)
        request = _required_env(env, command)
        request["config"] = config
        socket_path = str(config.get("agentSocket", DEFAULT_SOCKET))
        try:
            answer = call_agent(socket_path, request, AGENT_TIMEOUT_S)
        except AgentUnavailable as exc:
            if command == "DEL":
                record_pending_del(str(config.get("stateDir", DEFAULT_STATE_DIR)), request)
                return 0, None
            if command == "STATUS":
                raise CniError(spec.ERR_PLUGIN_NOT_AVAILABLE, "the tulle agent is not running", str(exc))
            raise CniError(spec.ERR_TRY_AGAIN_LATER, "the tulle agent is not reachable; try again later", str(exc))
        if "error" in answer:
            raise CniError.from_dict(answer["error"])
        result = answer.get("result")
        if command == "ADD":
            return 0, spec.convert_result(result or {}, version)
        return 0, None
    except CniError as exc:
        return 1, exc.to_dict(_config_version(config))


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    stdin = sys.stdin.buffer.read()
    status, output = run(command, dict(os.environ), stdin)
    if output is not None:
        sys.stdout.write(quickjson.dumps(output))
        sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
