"""The CNI plugin binary against the spec (1.1.0), without an agent: versions, error codes,
environment checks, and DEL recorded while the agent is away."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tulle.cni import spec
from tulle.cni.spec import CniError, convert_result

from ..conftest import CNI_BIN_DIR

PLUGIN = os.path.join(CNI_BIN_DIR, "tulle")
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def run_plugin(command: str, config: Any, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    full_env = {"CNI_COMMAND": command, "CNI_PATH": CNI_BIN_DIR}
    full_env.update(env or {})
    stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
    proc = subprocess.run([PLUGIN], input=stdin, env=full_env, capture_output=True, timeout=30)
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
