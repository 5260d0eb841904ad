"""The CNI plugin binary against the spec (1.1.0), without an agent: versions, error codes,
environment checks, DEL recorded while the agent is away, and agents that fail mid-request."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tulle.cni import spec
from tulle.cni.spec import CniError, convert_result

from ..conftest import CNI_BIN_DIR

PLUGIN = os.path.join(CNI_BIN_DIR, "tulle")
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
# The tests' sockets and state dirs are in pytest's temporary directories: the runtime's
# environment adds that root to the plugin's /run/tulle and /var/lib/tulle.
TEST_ROOTS = {"TULLE_CNI_PATH_ROOTS": tempfile.gettempdir()}


def run_plugin_process(
    command: str, config: Any, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {"CNI_COMMAND": command, "CNI_PATH": CNI_BIN_DIR, **TEST_ROOTS}
    full_env.update(env or {})
    stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
    return subprocess.run([PLUGIN], input=stdin, env=full_env, capture_output=True, timeout=30)


def run_plugin(command: str, config: Any, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    proc = run_plugin_process(command, config, env)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out


def config(tmp_path: Path, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    conf = {
        "cniVersion": version,
        "name": "tulle",
        "type": "tulle",
        "agentSocket": str(tmp_path / "no-agent.sock"),
        "stateDir": str(tmp_path / "state"),
    }
    conf.update(extra)
    return conf


ATTACH_ENV = {"CNI_CONTAINERID": "ctr1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/none"}


def test_plugin_is_built_as_one_file_started_by_system_python() -> None:
    with open(PLUGIN, "rb") as f:
        assert f.readline() == b"#!/usr/bin/python3 -S\n"


@pytest.mark.parametrize("version", VERSIONS)
def test_version_lists_every_supported_version_in_the_requested_version(version: str) -> None:
    status, out = run_plugin("VERSION", {"cniVersion": version})
    assert status == 0
    assert out == {"cniVersion": version, "supportedVersions": VERSIONS}


def test_version_without_input_answers_in_the_newest_version() -> None:
    status, out = run_plugin("VERSION", b"")
    assert status == 0 and out is not None
    assert out["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("bad", ["0.2.0", "1.2.0", "2.0.0", "banana"])
def test_unknown_cni_version_is_error_1(tmp_path: Path, bad: str) -> None:
    status, out = run_plugin("ADD", config(tmp_path, version=bad), ATTACH_ENV)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_INCOMPATIBLE_VERSION
    assert bad in out["msg"]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_040(tmp_path: Path, version: str) -> None:
    status, out = run_plugin("CHECK", config(tmp_path, version=version), ATTACH_ENV)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_INCOMPATIBLE_VERSION
    assert "0.4.0" in out["msg"]


@pytest.mark.parametrize("command", ["STATUS", "GC"])
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_status_and_gc_need_110(tmp_path: Path, command: str, version: str) -> None:
    status, out = run_plugin(command, config(tmp_path, version=version))
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_INCOMPATIBLE_VERSION
    assert out["cniVersion"] == version


def test_malformed_json_is_error_6(tmp_path: Path) -> None:
    status, out = run_plugin("ADD", b'{"cniVersion": "1.0.0", "name": ', ATTACH_ENV)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_DECODE
    assert "not valid JSON" in out["msg"]


def test_config_that_is_not_an_object_is_error_6(tmp_path: Path) -> None:
    _status, out = run_plugin("ADD", b"[1, 2]", ATTACH_ENV)
    assert out is not None and out["code"] == spec.ERR_DECODE


@pytest.mark.parametrize("field", ["name", "type", "cniVersion"])
def test_missing_config_field_names_the_field(tmp_path: Path, field: str) -> None:
    conf = config(tmp_path)
    del conf[field]
    status, out = run_plugin("ADD", conf, ATTACH_ENV)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_INVALID_CONFIG
    assert field in out["msg"] + out.get("details", "")


def test_bad_mtu_is_error_7(tmp_path: Path) -> None:
    _status, out = run_plugin("ADD", config(tmp_path, mtu=10), ATTACH_ENV)
    assert out is not None and out["code"] == spec.ERR_INVALID_CONFIG and "mtu" in out["msg"]


@pytest.mark.parametrize(
    ("missing", "command"),
    [
        ("CNI_CONTAINERID", "ADD"),
        ("CNI_IFNAME", "ADD"),
        ("CNI_NETNS", "ADD"),
        ("CNI_NETNS", "CHECK"),
        ("CNI_IFNAME", "DEL"),
    ],
)
def test_missing_environment_is_error_4(tmp_path: Path, missing: str, command: str) -> None:
    env = {k: v for k, v in ATTACH_ENV.items() if k != missing}
    status, out = run_plugin(command, config(tmp_path), env)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_INVALID_ENVIRONMENT
    assert missing in out["msg"]


@pytest.mark.parametrize("ifname", ["", ".", "..", "a/b", "a:b", "has space", "x" * 16])
def test_invalid_interface_name_is_error_4(tmp_path: Path, ifname: str) -> None:
    _status, out = run_plugin("ADD", config(tmp_path), dict(ATTACH_ENV, CNI_IFNAME=ifname))
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT


@pytest.mark.parametrize("container_id", ["-abc", "_x", "a b", "a/b"])
def test_invalid_container_id_is_error_4(tmp_path: Path, container_id: str) -> None:
    _status, out = run_plugin("ADD", config(tmp_path), dict(ATTACH_ENV, CNI_CONTAINERID=container_id))
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT


def test_unknown_command_is_error_4(tmp_path: Path) -> None:
    _status, out = run_plugin("FROB", config(tmp_path), ATTACH_ENV)
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT and "FROB" in out["msg"]


def test_malformed_cni_args_is_error_4(tmp_path: Path) -> None:
    _status, out = run_plugin("ADD", config(tmp_path), dict(ATTACH_ENV, CNI_ARGS="K8S_POD_NAME"))
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT and "CNI_ARGS" in out["msg"]


def test_add_with_agent_down_is_error_11(tmp_path: Path) -> None:
    status, out = run_plugin("ADD", config(tmp_path), ATTACH_ENV)
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_TRY_AGAIN_LATER
    assert "agent" in out["msg"] and str(tmp_path) in out["details"]


def test_status_with_agent_down_is_error_50(tmp_path: Path) -> None:
    status, out = run_plugin("STATUS", config(tmp_path))
    assert status != 0 and out is not None
    assert out["code"] == spec.ERR_PLUGIN_NOT_AVAILABLE


def test_del_with_agent_down_succeeds_and_is_recorded(tmp_path: Path) -> None:
    """A DEL that arrives while the agent is down is kept for the agent to carry out."""
    conf = config(tmp_path, version="1.0.0")
    status, out = run_plugin("DEL", conf, dict(ATTACH_ENV, CNI_ARGS="K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"))
    assert status == 0 and out is None
    pending = list((tmp_path / "state" / "pending-del").glob("*.json"))
    assert len(pending) == 1
    recorded = json.loads(pending[0].read_text())
    assert recorded["command"] == "DEL"
    assert recorded["containerID"] == "ctr1"
    assert recorded["args"]["K8S_POD_NAME"] == "a"
    # A repeated DEL is recorded once, not twice.
    run_plugin("DEL", conf, ATTACH_ENV)
    assert len(list((tmp_path / "state" / "pending-del").glob("*.json"))) == 1


def test_del_without_netns_is_accepted(tmp_path: Path) -> None:
    env = {k: v for k, v in ATTACH_ENV.items() if k != "CNI_NETNS"}
    status, out = run_plugin("DEL", config(tmp_path), env)
    assert status == 0 and out is None


# -- results per version (pure) -------------------------------------------------------------

RESULT_110 = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "tl0123456789a", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1450},
        {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/p", "mtu": 1450},
    ],
    "ips": [
        {"address": "10.244.0.5/32", "gateway": "169.254.1.1", "interface": 1},
        {"address": "fd00::5/128", "gateway": "fe80::1", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": "fe80::1"}],
    "dns": {},
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_the_address_version(version: str) -> None:
    out = convert_result(RESULT_110, version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert all("mtu" not in iface for iface in out["interfaces"])


def test_100_result_has_no_address_version_and_no_110_fields() -> None:
    out = convert_result(RESULT_110, "1.0.0")
    assert all("version" not in ip for ip in out["ips"])
    assert all("mtu" not in iface for iface in out["interfaces"])
    assert out["interfaces"][0] == {"name": "tl0123456789a", "mac": "ee:ee:ee:ee:ee:ee"}


def test_110_result_keeps_interface_mtu() -> None:
    out = convert_result(RESULT_110, "1.1.0")
    assert out["interfaces"][1]["mtu"] == 1450
    assert out["interfaces"][1]["sandbox"] == "/run/netns/p"


def test_cni_args_parse() -> None:
    assert spec.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a;K8S_POD_NAMESPACE=x") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "a",
        "K8S_POD_NAMESPACE": "x",
    }
    with pytest.raises(CniError):
        spec.parse_cni_args("novalue")


def test_a_full_listen_queue_is_waited_on_not_reported_as_agent_down(tmp_path: Path) -> None:
    """A runtime's burst of ADDs fills the agent's listen queue; the plugin must queue up, not fail."""
    import socket
    import threading
    import time

    from tulle.cni.plugin import call_agent

    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    for sock in queued:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            pass  # the queue is full: exactly the state under test

    def answer_late() -> None:
        time.sleep(0.3)
        for sock in queued:
            sock.close()  # the earlier callers give up; the plugin's connection is still to come
        while True:  # the abandoned connections first (empty), then the plugin's
            conn, _ = server.accept()
            request = b""
            while chunk := conn.recv(65536):
                request += chunk
            if request:
                conn.sendall(json.dumps({"echo": json.loads(request)}).encode())
                conn.close()
                return
            conn.close()

    answerer = threading.Thread(target=answer_late, daemon=True)
    answerer.start()
    try:
        assert call_agent(path, {"command": "ADD"}, timeout=5) == {"echo": {"command": "ADD"}}
    finally:
        answerer.join(timeout=5)
        server.close()


# -- agents that fail mid-request -----------------------------------------------------------
# A fake agent listens on the config's agentSocket (in tmp_path) and treats each connection
# with one of the behaviours below; the plugin must turn every failure into a CNI error JSON.

AgentBehaviour = Callable[[socket.socket], None]


def agent_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return config(tmp_path, agentSocket=str(tmp_path / "agent.sock"), **extra)


@contextlib.contextmanager
def fake_agent(socket_path: str, behaviour: AgentBehaviour) -> Iterator[list[socket.socket]]:
    """Serve `behaviour` on every connection until the block ends; yields the connections kept open."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    server.settimeout(0.05)
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(conn)
            behaviour(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield connections
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
        for conn in connections:
            conn.close()


def reset_after_reading(conn: socket.socket) -> None:
    """Take in the whole request, then die: the agent crashing while it works on the request.

    A unix socket has no RST (SO_LINGER does nothing on it); Linux reports ECONNRESET to the peer
    when a socket is closed with data still in its receive queue, so the request is peeked at
    (seen whole) but left unconsumed.
    """
    conn.settimeout(5)
    while True:
        seen = conn.recv(1 << 20, socket.MSG_PEEK)
        try:
            json.loads(seen)
            break
        except ValueError:
            time.sleep(0.01)  # the rest of the request is on its way
    conn.close()


def answer_with(raw: bytes) -> AgentBehaviour:
    """Read the request to its end, answer `raw`, close: an agent that speaks nonsense."""

    def behaviour(conn: socket.socket) -> None:
        conn.settimeout(5)
        while conn.recv(65536):
            pass
        conn.sendall(raw)
        conn.close()

    return behaviour


def close_without_reading(conn: socket.socket) -> None:
    conn.close()


def keep_open_without_reading(conn: socket.socket) -> None:
    pass  # fake_agent closes it at the end


def pending_dels(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (tmp_path / "state" / "pending-del").glob("*.json")]


def test_add_when_the_agent_resets_the_connection_is_error_11_not_a_traceback(tmp_path: Path) -> None:
    """Issue 7: the plugin binary crashed with ConnectionResetError when the agent died mid-request."""
    conf = agent_config(tmp_path)
    with fake_agent(conf["agentSocket"], reset_after_reading):
        proc = run_plugin_process("ADD", conf, ATTACH_ENV)
    assert b"Traceback" not in proc.stderr
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == spec.ERR_TRY_AGAIN_LATER
    assert out["cniVersion"] == "1.1.0"
    assert conf["agentSocket"] in out["details"] and "reset" in out["details"]


def test_del_when_the_agent_resets_the_connection_succeeds_and_is_recorded(tmp_path: Path) -> None:
    conf = agent_config(tmp_path)
    with fake_agent(conf["agentSocket"], reset_after_reading):
        proc = run_plugin_process("DEL", conf, ATTACH_ENV)
    assert b"Traceback" not in proc.stderr
    assert proc.returncode == 0 and proc.stdout == b""
    [recorded] = pending_dels(tmp_path)
    assert recorded["command"] == "DEL" and recorded["containerID"] == "ctr1" and recorded["ifname"] == "eth0"


def _expect_agent_unavailable(tmp_path: Path, command: str, proc: subprocess.CompletedProcess[bytes]) -> None:
    """What each command answers when the agent cannot be used: DEL is kept for later and succeeds,
    STATUS is 50 "plugin not available", ADD, CHECK and GC are 11 "try again later"."""
    assert b"Traceback" not in proc.stderr
    if command == "DEL":
        assert proc.returncode == 0 and proc.stdout == b""
        assert [r["command"] for r in pending_dels(tmp_path)] == ["DEL"]
        return
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    expected = spec.ERR_PLUGIN_NOT_AVAILABLE if command == "STATUS" else spec.ERR_TRY_AGAIN_LATER
    assert out["code"] == expected
    assert str(tmp_path / "agent.sock") in out["details"]


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
def test_an_answer_that_is_not_json_is_agent_unavailable(tmp_path: Path, command: str) -> None:
    conf = agent_config(tmp_path)
    with fake_agent(conf["agentSocket"], answer_with(b"\x00\xff this is not JSON")):
        proc = run_plugin_process(command, conf, ATTACH_ENV)
    _expect_agent_unavailable(tmp_path, command, proc)


WRONG_SHAPES_FOR_ADD = [
    b"[1, 2]",
    b'"ok"',
    b"null",
    b"{}",  # neither result nor error: not a success with no addresses
    b'{"error": "boom"}',
    b'{"error": {"code": "eleven", "msg": "x"}}',
    b'{"error": {"code": 7, "msg": ["not", "a", "string"]}}',
    b'{"result": [1]}',
    b'{"result": null}',
    b'{"result": {"ips": "10.244.0.5/32"}}',
    b'{"result": {"ips": [{"gateway": "169.254.1.1"}]}}',
    b'{"result": {"ips": [], "interfaces": [1]}}',
    b'{"result": {"ips": [], "routes": {"dst": "0.0.0.0/0"}}}',
    b'{"result": {"ips": [], "dns": ["8.8.8.8"]}}',
]


@pytest.mark.parametrize("answer", WRONG_SHAPES_FOR_ADD)
def test_add_answer_of_the_wrong_shape_is_error_11(tmp_path: Path, answer: bytes) -> None:
    conf = agent_config(tmp_path)
    with fake_agent(conf["agentSocket"], answer_with(answer)):
        proc = run_plugin_process("ADD", conf, ATTACH_ENV)
    _expect_agent_unavailable(tmp_path, "ADD", proc)


@pytest.mark.parametrize("command", ["DEL", "CHECK", "STATUS", "GC"])
@pytest.mark.parametrize("answer", [b"[]", b'{"error": "boom"}', b'{"error": {"msg": "no code"}}', b'{"result": 5}'])
def test_other_answers_of_the_wrong_shape_are_agent_unavailable(tmp_path: Path, command: str, answer: bytes) -> None:
    conf = agent_config(tmp_path)
    with fake_agent(conf["agentSocket"], answer_with(answer)):
        proc = run_plugin_process(command, conf, ATTACH_ENV)
    _expect_agent_unavailable(tmp_path, command, proc)


def test_a_well_formed_agent_error_is_passed_on_as_it_is(tmp_path: Path) -> None:
    conf = agent_config(tmp_path)
    agent_error = {"code": spec.ERR_IPAM_EXHAUSTED, "msg": "no address left", "details": "pool p"}
    with fake_agent(conf["agentSocket"], answer_with(json.dumps({"error": agent_error}).encode())):
        status, out = run_plugin("ADD", conf, ATTACH_ENV)
    assert status == 1 and out == dict(agent_error, cniVersion="1.1.0")


def test_an_agent_that_closes_without_reading_a_large_request_is_error_11(tmp_path: Path) -> None:
    """A request larger than the socket's buffers meets a closed agent in sendall (EPIPE)."""
    conf = agent_config(tmp_path, padding="x" * (4 << 20))
    with fake_agent(conf["agentSocket"], close_without_reading):
        proc = run_plugin_process("ADD", conf, ATTACH_ENV)
    assert b"Traceback" not in proc.stderr
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == spec.ERR_TRY_AGAIN_LATER and conf["agentSocket"] in out["details"]


def test_an_agent_that_never_reads_the_request_times_out_as_agent_unavailable(tmp_path: Path) -> None:
    from tulle.cni.plugin import AgentUnavailable, call_agent

    path = str(tmp_path / "agent.sock")
    with fake_agent(path, keep_open_without_reading), pytest.raises(AgentUnavailable) as raised:
        call_agent(path, {"command": "ADD", "padding": "x" * (4 << 20)}, timeout=0.3)
    assert path in str(raised.value) and "\n" not in str(raised.value)


def test_del_with_agent_down_and_a_state_dir_that_cannot_be_written_is_error_11(tmp_path: Path) -> None:
    """Nothing may be lost: a DEL neither delivered nor recorded must fail so the runtime retries.
    (The state dir goes through a regular file: chmod would not stop root, which CI runs as.)"""
    (tmp_path / "afile").write_text("")
    state_dir = str(tmp_path / "afile" / "sub")
    proc = run_plugin_process("DEL", config(tmp_path, stateDir=state_dir), ATTACH_ENV)
    assert b"Traceback" not in proc.stderr
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == spec.ERR_TRY_AGAIN_LATER
    assert state_dir in out["msg"]


def test_main_turns_an_unexpected_exception_into_error_102(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last-resort guard: a bug in the plugin is still answered with a CNI error, never a traceback."""
    from tulle.cni import plugin

    def broken_run(command: str, env: dict[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
        raise KeyError("address")

    monkeypatch.setattr(plugin, "run", broken_run)
    monkeypatch.setenv("CNI_COMMAND", "ADD")
    stdin = json.dumps(config(tmp_path, version="1.0.0")).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exited:
        plugin.main()
    assert exited.value.code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["code"] == spec.ERR_INTERNAL and out["cniVersion"] == "1.0.0"
    assert out["msg"].startswith("the tulle plugin failed: ") and "address" in out["msg"]
    assert "Traceback" not in captured.err
