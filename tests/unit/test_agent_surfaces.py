"""Issue 9: no pod can impersonate another or reach the control plane, through the plugin's
configuration, its environment, the agent's socket or its state on disk.

Invariants:
- a CNI configuration's paths (agentSocket, stateDir) are absolute, normalized and under
  /run/tulle or /var/lib/tulle (or a directory the runtime's TULLE_CNI_PATH_ROOTS adds), else 7;
- the plugin talks only to a socket that is root's, served by a root process, else 11;
- a pod's namespace and name (CNI_ARGS) are names the API server would take, else 4, because they
  become the WorkloadEndpoint's key in the datastore;
- the agent's socket is 0600 from the moment it exists; its state directories are 0700 and its
  files 0600; it does not start on a state directory others may use, or a socket directory
  others may write in;
- `../`, NUL and very long values in any field are refused cleanly: an error object, no
  traceback, nothing written;
- no string reaches a shell: no `shell=True`, `os.system` or `os.popen` in the source.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tulle.agent import api
from tulle.agent.cni_service import CniContext, CniService, pod_identity
from tulle.agent.endpoints import Endpoint, EndpointRegistry, prepare_state_dir
from tulle.agent.main import AgentConfig, run_agent
from tulle.agent.pending import PendingDeletes
from tulle.cni import plugin, spec
from tulle.cni.files import UnsafePermissions, check_private_dir, make_private_dir
from tulle.cni.spec import CniError
from tulle.datastore.factory import open_datastore
from tulle.datastore.memory import forget_server, memory_server
from tulle.ipam.allocator import NodeAllocator
from tulle.model.kinds import WORKLOAD_ENDPOINT
from tulle.model.pools import parse_pool, pool_object

from ..conftest import REPO
from .test_cni_plugin import ATTACH_ENV, TEST_ROOTS, agent_config, fake_agent, run_plugin

POOLS = [parse_pool(pool_object("v4", "10.244.0.0/16", 26)), parse_pool(pool_object("v6", "fd00:10:244::/104", 122))]
OTHER_UID = 4242
LONG = "a" * 100_000
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def run(command: str, conf: dict[str, Any], env: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """The plugin in this process (plugin.run), with the test's temporary directories allowed."""
    full = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", **TEST_ROOTS, **ATTACH_ENV}
    full.update(env or {})
    return plugin.run(command, full, json.dumps(conf).encode())


# -- the configuration's paths --------------------------------------------------------------------

BAD_PATHS = [
    ("run/tulle/agent.sock", "not an absolute path"),
    ("../run/tulle/agent.sock", "not an absolute path"),
    ("/run/tulle/../../etc/cron.d/x", "'..' segment"),
    ("/run/tulle/..", "'..' segment"),
    ("/run/tulle/./agent.sock", "not normalized"),
    ("/run/tulle//agent.sock", "not normalized"),
    ("/run/tulle/agent.sock/", "not normalized"),
    ("/run/tulle/a\0b", "NUL"),
    ("/etc/cron.d/x", "outside /run/tulle, /var/lib/tulle"),
    ("/run/tullex/agent.sock", "outside"),
    ("/var/lib/tulle-other", "outside"),
    ("/run/tulle/" + "a" * 5000, "longer than"),
]


@pytest.mark.parametrize("field", plugin.PATH_FIELDS)
@pytest.mark.parametrize(("path", "reason"), BAD_PATHS)
def test_a_path_field_that_is_not_a_clean_path_under_the_roots_is_error_7(field: str, path: str, reason: str) -> None:
    conf = {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle", field: path}
    status, out = plugin.run("ADD", {"CNI_PATH": "/opt/cni/bin", **ATTACH_ENV}, json.dumps(conf).encode())
    assert status == 1 and out is not None
    assert out["code"] == spec.ERR_INVALID_CONFIG
    assert field in out["msg"] and f"field: {field}" in out["details"] and reason in out["details"], out
    assert len(out["details"]) < 500  # a 5,000-byte value is not repeated whole


@pytest.mark.parametrize("field", plugin.PATH_FIELDS)
def test_a_path_field_that_is_not_a_string_is_error_7(field: str) -> None:
    conf = {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle", field: ["/run/tulle"]}
    _status, out = plugin.run("DEL", {"CNI_PATH": "x", **ATTACH_ENV}, json.dumps(conf).encode())
    assert out is not None and out["code"] == spec.ERR_INVALID_CONFIG and "not a string" in out["details"]


def test_the_defaults_directories_are_allowed_and_the_lab_lives_in_them() -> None:
    conf = {
        "cniVersion": "1.1.0",
        "name": "tulle",
        "type": "tulle",
        "agentSocket": "/run/tulle/labs/x/nodes/node1/agent.sock",
        "stateDir": "/var/lib/tulle",
    }
    _status, out = plugin.run("ADD", {"CNI_PATH": "x", **ATTACH_ENV}, json.dumps(conf).encode())
    assert out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER  # past the config: no agent there


def test_a_socket_path_longer_than_a_unix_socket_takes_is_error_7() -> None:
    conf = {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle", "agentSocket": "/run/tulle/" + "s" * 100}
    _status, out = plugin.run("ADD", {"CNI_PATH": "x", **ATTACH_ENV}, json.dumps(conf).encode())
    assert out is not None and out["code"] == spec.ERR_INVALID_CONFIG and "107 bytes" in out["details"]


def test_only_the_runtimes_environment_adds_roots(tmp_path: Path) -> None:
    """A configuration cannot widen its own roots: an unknown field is ignored, the variable is not."""
    conf = agent_config(tmp_path, TULLE_CNI_PATH_ROOTS=str(tmp_path))
    env = {"CNI_PATH": "x", **ATTACH_ENV}
    _status, out = plugin.run("ADD", env, json.dumps(conf).encode())
    assert out is not None and out["code"] == spec.ERR_INVALID_CONFIG and "outside" in out["details"]
    _status, out = plugin.run("ADD", {**env, plugin.PATH_ROOTS_ENV: f"/nowhere:{tmp_path}"}, json.dumps(conf).encode())
    assert out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER  # allowed; no agent listens


@pytest.mark.parametrize("roots", ["relative/dir", "/tmp/../etc", "/tmp/a\0b"])
def test_roots_that_are_not_clean_absolute_paths_are_error_4(tmp_path: Path, roots: str) -> None:
    env = {"CNI_PATH": "x", **ATTACH_ENV, plugin.PATH_ROOTS_ENV: roots}
    _status, out = plugin.run("ADD", env, json.dumps(agent_config(tmp_path)).encode())
    assert out is not None and out["code"] == spec.ERR_INVALID_ENVIRONMENT and plugin.PATH_ROOTS_ENV in out["msg"]


def test_the_plugin_binary_reads_the_roots_from_its_environment(tmp_path: Path) -> None:
    conf = agent_config(tmp_path)
    status, out = run_plugin("ADD", conf, dict(ATTACH_ENV, TULLE_CNI_PATH_ROOTS="/nowhere"))
    assert status == 1 and out is not None and out["code"] == spec.ERR_INVALID_CONFIG
    status, out = run_plugin("ADD", conf, ATTACH_ENV)  # run_plugin allows the temporary directory
    assert status == 1 and out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER


def test_a_del_recorded_by_the_plugin_makes_a_private_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "fresh" / "state"
    status, _out = run("DEL", agent_config(tmp_path, stateDir=str(state)))
    assert status == 0
    for folder in (state, state / "pending-del"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    [record] = (state / "pending-del").iterdir()
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


# -- the agent's socket, as the plugin sees it ---------------------------------------------------


@contextlib.contextmanager
def listening(path: Path, answer: bytes = b'{"result": null}') -> Iterator[list[bytes]]:
    """A root-run agent on `path` that answers every request with `answer`; yields what it was sent."""
    received: list[bytes] = []

    def answer_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.append(data)
            conn.sendall(answer)

    with fake_agent(str(path), answer_one):
        yield received


@needs_root
def test_a_socket_not_owned_by_root_is_not_talked_to(tmp_path: Path) -> None:
    sock_path = tmp_path / "agent.sock"
    with listening(sock_path) as received:
        os.chown(sock_path, OTHER_UID, OTHER_UID)
        status, out = run("ADD", agent_config(tmp_path))
        assert status == 1 and out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER
        assert str(sock_path) in out["details"] and f"uid {OTHER_UID}, not by root" in out["details"], out
        status, out = run("STATUS", agent_config(tmp_path))
        assert out is not None and out["code"] == spec.ERR_PLUGIN_NOT_AVAILABLE
        # A DEL is kept for the real agent, as when no agent answers.
        assert run("DEL", agent_config(tmp_path)) == (0, None)
        assert len(list((tmp_path / "state" / "pending-del").iterdir())) == 1
        assert received == []  # nothing was sent


def test_a_path_that_is_not_a_socket_is_not_talked_to(tmp_path: Path) -> None:
    (tmp_path / "agent.sock").write_text("")
    _status, out = run("ADD", agent_config(tmp_path))
    assert out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER and "is not a socket" in out["details"]


LISTEN_AS_ANOTHER_USER = f"""
import os, socket, sys, time
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])          # as root: the socket file is root's
os.setresgid({OTHER_UID}, {OTHER_UID}, {OTHER_UID})
os.setresuid({OTHER_UID}, {OTHER_UID}, {OTHER_UID})  # then listen as another user: the peer's credentials are these
server.listen(8)
print("listening", flush=True)
time.sleep(30)
"""


@needs_root
def test_a_root_owned_socket_served_by_another_user_is_sent_nothing(tmp_path: Path) -> None:
    """The socket file may be swapped between the check of its owner and the connect: the process
    at the other end must be root's too (SO_PEERCRED)."""
    sock_path = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-c", LISTEN_AS_ANOTHER_USER, str(sock_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"listening\n"
        assert sock_path.stat().st_uid == 0
        _status, out = run("ADD", agent_config(tmp_path))
        assert out is not None and out["code"] == spec.ERR_TRY_AGAIN_LATER
        assert f"runs as uid {OTHER_UID}, not as root" in out["details"], out
    finally:
        proc.kill()
        proc.wait()


# -- the agent's socket and state, as the agent makes them ---------------------------------------


def test_the_socket_is_0600_from_the_moment_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run" / "agent.sock"
    seen: list[tuple[int, int]] = []
    rename = os.rename

    def watched_rename(src: str, dst: str) -> None:
        # What is about to appear at the socket's path, and the directory it was made in.
        seen.append((stat.S_IMODE(os.stat(src).st_mode), stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode)))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", watched_rename)
    server = api.serve(str(path), lambda request: {"result": None})
    try:
        assert seen == [(0o600, 0o700)]
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # made by the agent: 0700
        assert sorted(os.listdir(path.parent)) == ["agent.sock"]  # the private directory is gone
    finally:
        server.shutdown()
        server.server_close()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server = api.serve(str(path), lambda request: {"result": {"pong": request.get("command")}})
    try:
        assert plugin.call_agent(str(path), {"command": "PING"}, 5) == {"result": {"pong": "PING"}}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_socket_directory_others_may_write_in_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(UnsafePermissions) as refused:
        api.prepare_socket_dir(str(folder / "agent.sock"))
    assert str(folder) in str(refused.value) and f"{mode & 0o7777:04o}" in str(refused.value)


def test_a_socket_directory_others_may_only_look_in_is_taken(tmp_path: Path) -> None:
    """The lab's node directories are 0755: the socket in them is 0600, so only its name shows."""
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o755)
    api.prepare_socket_dir(str(folder / "agent.sock"))


def test_the_state_dirs_are_made_0700(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state"
    prepare_state_dir(str(state))
    for folder in (state, state / "endpoints", state / "pending-del"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize("where", ["", "endpoints", "pending-del"])
@pytest.mark.parametrize("mode", [0o755, 0o750, 0o705, 0o711, 0o770])
def test_a_state_dir_others_may_use_is_refused(tmp_path: Path, where: str, mode: int) -> None:
    state = tmp_path / "state"
    prepare_state_dir(str(state))
    (state / where).chmod(mode)
    with pytest.raises(UnsafePermissions) as refused:
        prepare_state_dir(str(state))
    assert str(state / where).rstrip("/") in str(refused.value) and f"{mode:04o}" in str(refused.value)


@needs_root
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_private_dir(str(state))
    os.chown(state, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePermissions, match=f"owned by uid {OTHER_UID}"):
        check_private_dir(str(state), "the state directory")


def test_the_agent_refuses_to_start_on_a_wide_state_dir_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    config = AgentConfig(node="n1", datastore="memory://never-opened", state_dir=str(state), socket=str(tmp_path / "s"))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        run_agent(config)
    assert exited.value.code == 1
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    error = str(record.__dict__.get("error"))
    assert str(state) in error and "0755" in error and "\n" not in error
    assert record.exc_info is None  # a message, not a traceback


def test_the_agent_refuses_to_start_on_a_socket_dir_others_may_write_in(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    config = AgentConfig(
        node="n1", datastore="memory://never-opened", state_dir=str(tmp_path / "state"), socket=str(run_dir / "a.sock")
    )
    with pytest.raises(SystemExit):
        run_agent(config)


def test_endpoint_records_and_pending_dels_are_0600(tmp_path: Path) -> None:
    registry = EndpointRegistry(str(tmp_path / "state"))
    registry.put(Endpoint("tulle", "c1", "eth0", "/run/netns/x", "web", "a", "tl0"))
    PendingDeletes(str(tmp_path / "state")).record(
        {"command": "DEL", "containerID": "c1", "ifname": "eth0", "config": {"name": "tulle"}}
    )
    files = [*(tmp_path / "state" / "endpoints").iterdir(), *(tmp_path / "state" / "pending-del").iterdir()]
    assert len(files) == 2
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


# -- the agent's protocol --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'"ADD"', "must be a JSON object, not str"),
        (b"null", "must be a JSON object, not NoneType"),
        (b"\xff\xfe{", "could not decode"),
        (b"[" * 100_000, "could not decode"),  # deeper than the parser goes: RecursionError
        (b" " * (api.MAX_REQUEST_BYTES + 1), "larger than"),
    ],
)
def test_a_request_that_is_not_a_json_object_is_answered_with_error_6(data: bytes, problem: str) -> None:
    answer = json.loads(api.answer_request(data, lambda request: {"result": None}))
    assert answer["error"]["code"] == spec.ERR_DECODE and problem in answer["error"]["msg"] + answer["error"].get(
        "details", ""
    )


def test_a_dispatch_that_fails_is_answered_with_error_102() -> None:
    def broken(request: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("containerID")

    answer = json.loads(api.answer_request(b'{"command": "ADD"}', broken))
    assert answer["error"]["code"] == spec.ERR_INTERNAL and "containerID" in answer["error"]["msg"]


def test_a_client_that_never_finishes_its_request_gets_an_answer_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api._Handler, "timeout", 0.3)
    path = tmp_path / "agent.sock"
    server = api.serve(str(path), lambda request: {"result": None})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            client.sendall(b'{"command": ')  # and never the rest, nor a shutdown
            answer = json.loads(client.recv(65536))
        assert answer["error"]["code"] == spec.ERR_DECODE and "no whole request" in answer["error"]["msg"]
    finally:
        server.shutdown()
        server.server_close()


# -- CNI_ARGS: the pod's namespace and name ------------------------------------------------------


def request(namespace: str | None, pod: str | None, container: str = "c1") -> dict[str, Any]:
    args = {k: v for k, v in (("K8S_POD_NAMESPACE", namespace), ("K8S_POD_NAME", pod)) if v is not None}
    return {"containerID": container, "args": args}


@pytest.mark.parametrize(
    "namespace", ["../ipamblocks", "a/b", "kube-system\0", "Web", "web.shop", "-web", "a" * 64, LONG, "ns\n"]
)
def test_a_namespace_the_api_server_would_not_take_is_error_4(namespace: str) -> None:
    with pytest.raises(CniError) as refused:
        pod_identity(request(namespace, "a"))
    assert refused.value.code == spec.ERR_INVALID_ENVIRONMENT
    assert "K8S_POD_NAMESPACE" in refused.value.msg and "K8S_POD_NAMESPACE" in refused.value.details
    assert len(refused.value.msg) < 600


@pytest.mark.parametrize("pod", ["../x", "a/b", "..", "x\0", "Web", "a_b", "-a", "a.", "a" * 254, LONG])
def test_a_pod_name_the_api_server_would_not_take_is_error_4(pod: str) -> None:
    with pytest.raises(CniError) as refused:
        pod_identity(request("web", pod))
    assert refused.value.code == spec.ERR_INVALID_ENVIRONMENT and "K8S_POD_NAME" in refused.value.details


def test_names_the_api_server_takes_are_taken() -> None:
    assert pod_identity(request("web", "a.b-c")) == ("web", "a.b-c")
    assert pod_identity(request("web", "a" * 253)) == ("web", "a" * 253)
    assert pod_identity(request(None, None, container="0123abc")) == ("default", "0123abc")
    # podman's container IDs are hex; another runtime's may not be a pod name as they are
    assert pod_identity(request(None, None, container="Ctr_1.")) == ("default", "ctr-1")


@dataclass
class CniUnderTest:
    service: CniService
    registry: EndpointRegistry
    allocator: NodeAllocator
    pending: PendingDeletes
    made: dict[str, Any]
    netns: str
    ds: Any

    def nothing_written(self) -> bool:
        return (
            self.registry.all() == []
            and self.allocator.allocations() == {}
            and self.ds.list(WORKLOAD_ENDPOINT)[0] == []
            and self.pending.names() == []
            and self.made == {}
        )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[CniUnderTest]:
    name = f"surfaces-{os.getpid()}-{id(tmp_path)}"
    memory_server(name)
    ds = open_datastore(f"memory://{name}")
    for pool in (("v4", "10.244.0.0/16", 26), ("v6", "fd00:10:244::/104", 122)):
        ds.create(pool_object(*pool))
    netns = tmp_path / "netns"
    netns.write_text("")
    made: dict[str, Any] = {}

    class PodNetwork:
        def create(self, pod: Any) -> str:
            made[pod.host_ifname] = pod
            return "02:00:00:00:00:01"

        def delete(self, host_ifname: str) -> bool:
            return made.pop(host_ifname, None) is not None

        def check(self, pod: Any, expect_routes: list[str]) -> list[str]:
            return [] if pod.host_ifname in made else ["gone"]

    registry = EndpointRegistry(str(tmp_path / "state"))
    pending = PendingDeletes(str(tmp_path / "state"))
    allocator = NodeAllocator(ds, "me", lambda: POOLS)
    ctx = CniContext(
        node="me", datastore=ds, registry=registry, allocator=allocator, pending=pending,
        families=lambda: [4, 6], pod_mtu=lambda: 1450, address_holders=lambda _a: [],
        sync_policy=lambda: None, endpoints_changed=lambda _h: None, readiness_problems=lambda: [],
        remove_stray_interfaces=lambda: 0, podnet=PodNetwork(),
    )  # fmt: skip
    yield CniUnderTest(CniService(ctx), registry, allocator, pending, made, str(netns), ds)
    forget_server(name)


def cni_request(agent: CniUnderTest, command: str = "ADD", **fields: Any) -> dict[str, Any]:
    req: dict[str, Any] = {
        "command": command,
        "containerID": "c1",
        "ifname": "eth0",
        "netns": agent.netns,
        "args": {"K8S_POD_NAMESPACE": "web", "K8S_POD_NAME": "a"},
        "config": {"name": "tulle"},
    }
    req.update(fields)
    return req


def test_an_add_with_a_pod_name_that_is_a_path_writes_nothing(agent: CniUnderTest) -> None:
    answer = agent.service.handle(cni_request(agent, args={"K8S_POD_NAMESPACE": "../ipamblocks", "K8S_POD_NAME": "x"}))
    assert answer["error"]["code"] == spec.ERR_INVALID_ENVIRONMENT and "K8S_POD_NAMESPACE" in answer["error"]["details"]
    assert agent.nothing_written()


def test_a_del_of_an_unknown_pod_with_a_bad_name_is_refused_and_a_known_pods_del_ignores_its_args(
    agent: CniUnderTest,
) -> None:
    answer = agent.service.handle(cni_request(agent, "DEL", args={"K8S_POD_NAME": "a/../../b"}))
    assert answer["error"]["code"] == spec.ERR_INVALID_ENVIRONMENT
    assert "result" in agent.service.handle(cni_request(agent))
    # The endpoint's own record names the pod: what this DEL's CNI_ARGS say does not matter.
    assert agent.service.handle(cni_request(agent, "DEL", args={"K8S_POD_NAME": "a/../../b"})) == {"result": None}
    assert agent.nothing_written()


AGENT_REFUSALS = [
    ({"config": {"name": ""}}, spec.ERR_INVALID_CONFIG, "field: name"),
    ({"config": {"name": "a/b"}}, spec.ERR_INVALID_CONFIG, "field: name"),
    ({"config": {"name": LONG}}, spec.ERR_INVALID_CONFIG, "field: name"),
    ({"config": {"name": "tulle", "mtu": "1450"}}, spec.ERR_INVALID_CONFIG, "field: mtu"),
    ({"config": "tulle"}, spec.ERR_INVALID_CONFIG, "field: config"),
    ({"containerID": "../c1"}, spec.ERR_INVALID_ENVIRONMENT, "CNI_CONTAINERID"),
    ({"containerID": 7}, spec.ERR_INVALID_ENVIRONMENT, "CNI_CONTAINERID"),
    ({"ifname": "eth\0"}, spec.ERR_INVALID_ENVIRONMENT, "CNI_IFNAME"),
    ({"netns": "/run/netns/a\0b"}, spec.ERR_INVALID_ENVIRONMENT, "CNI_NETNS"),
    ({"netns": "../netns"}, spec.ERR_INVALID_ENVIRONMENT, "CNI_NETNS"),
    ({"netns": "/" + LONG}, spec.ERR_INVALID_ENVIRONMENT, "CNI_NETNS"),
    ({"args": "K8S_POD_NAME=a"}, spec.ERR_INVALID_ENVIRONMENT, "CNI_ARGS"),
    ({"args": {"K8S_POD_NAME": ["a"]}}, spec.ERR_INVALID_ENVIRONMENT, "K8S_POD_NAME"),
    ({"command": ["ADD"]}, spec.ERR_INVALID_ENVIRONMENT, "does not know the command"),
    # found by the fuzzer (tests/fuzz/regressions/agent_api/): error 102, a KeyError in the agent
    ({"ifname": None}, spec.ERR_INVALID_ENVIRONMENT, "CNI_IFNAME"),
    # found by the fuzzer: an endpoint published with network "", which no agent can read back
    ({"config": {"name": ""}, "containerID": "c2"}, spec.ERR_INVALID_CONFIG, "field: name"),
]


@pytest.mark.parametrize(("fields", "code", "named"), AGENT_REFUSALS)
def test_the_agent_checks_again_what_the_plugin_checks(
    agent: CniUnderTest, fields: dict[str, Any], code: int, named: str
) -> None:
    """The socket takes requests from any root process, not only from the plugin: an ADD the
    plugin would have refused is refused here too, before anything is written (these were
    error 102, an exception in the agent, or an endpoint published with an empty network)."""
    answer = agent.service.handle(cni_request(agent, **fields))
    assert answer["error"]["code"] == code, answer
    assert named in answer["error"]["msg"] + answer["error"].get("details", "")
    assert agent.nothing_written()


@pytest.mark.parametrize("missing", ["ifname", "containerID", "netns", "config", "command"])
def test_a_request_without_a_field_is_refused_not_error_102(agent: CniUnderTest, missing: str) -> None:
    """Found by the fuzzer (tests/fuzz/regressions/agent_api/request-without-ifname-is-error-102)."""
    req = cni_request(agent)
    del req[missing]
    answer = agent.service.handle(req)
    assert answer["error"]["code"] in (spec.ERR_INVALID_ENVIRONMENT, spec.ERR_INVALID_CONFIG), answer
    assert agent.nothing_written()


@pytest.mark.parametrize(
    "prev",
    [{"ips": [{"address": "../"}]}, {"ips": "10.0.0.1"}, {"ips": [{"address": 5}]}, {"ips": [], "routes": 5}],
)
def test_a_check_with_a_prev_result_that_is_not_the_specs_is_error_7(agent: CniUnderTest, prev: Any) -> None:
    assert "result" in agent.service.handle(cni_request(agent))
    answer = agent.service.handle(cni_request(agent, "CHECK", config={"name": "tulle", "prevResult": prev}))
    assert answer["error"]["code"] == spec.ERR_INVALID_CONFIG, answer


# -- every string field: ../, NUL and 100 KB ----------------------------------------------------

NASTY = ["../../etc/passwd", "a\0b", LONG]

CONFIG_FIELDS = [
    ("cniVersion", {spec.ERR_INCOMPATIBLE_VERSION}),
    ("name", {spec.ERR_INVALID_CONFIG}),
    ("type", {spec.ERR_INVALID_CONFIG}),
    ("agentSocket", {spec.ERR_INVALID_CONFIG}),
    ("stateDir", {spec.ERR_INVALID_CONFIG}),
]
ENV_FIELDS = [
    ("CNI_COMMAND", {spec.ERR_INVALID_ENVIRONMENT}),
    ("CNI_CONTAINERID", {spec.ERR_INVALID_ENVIRONMENT}),
    ("CNI_IFNAME", {spec.ERR_INVALID_ENVIRONMENT}),
    ("CNI_NETNS", {spec.ERR_INVALID_ENVIRONMENT}),
    ("CNI_ARGS", {spec.ERR_INVALID_ENVIRONMENT}),
    ("K8S_POD_NAMESPACE", {spec.ERR_INVALID_ENVIRONMENT}),
    ("K8S_POD_NAME", {spec.ERR_INVALID_ENVIRONMENT}),
]


@dataclass
class Node:
    """A plugin and a real agent API (the CniService on the in-memory datastore) on a socket."""

    agent: CniUnderTest
    socket: str
    state: Path


@pytest.fixture
def node(agent: CniUnderTest, tmp_path: Path) -> Iterator[Node]:
    path = str(tmp_path / "agent.sock")
    server = api.serve(path, agent.service.handle)
    yield Node(agent, path, tmp_path / "state")
    server.shutdown()
    server.server_close()


def _add(node: Node, conf_change: dict[str, Any], env_change: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
    conf = {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle", "agentSocket": node.socket}
    conf["stateDir"] = str(node.state)
    conf.update(conf_change)
    args = {"K8S_POD_NAMESPACE": "web", "K8S_POD_NAME": "a"}
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_CONTAINERID": "c1",
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": node.agent.netns,
        **TEST_ROOTS,
    }
    for name, value in env_change.items():
        if name.startswith("K8S_"):
            args[name] = value
        else:
            env[name] = value
    env.setdefault("CNI_ARGS", ";".join(f"{k}={v}" for k, v in args.items()))
    return plugin.run(env["CNI_COMMAND"], env, json.dumps(conf).encode())


def test_a_clean_add_works_through_the_same_path(node: Node) -> None:
    status, out = _add(node, {}, {})
    assert status == 0 and out is not None and len(out["ips"]) == 2


@pytest.mark.parametrize("value", NASTY, ids=["dotdot", "nul", "100KB"])
@pytest.mark.parametrize(("field", "codes"), CONFIG_FIELDS + ENV_FIELDS, ids=[f for f, _ in CONFIG_FIELDS + ENV_FIELDS])
def test_every_string_field_refuses_dotdot_nul_and_100kb_cleanly(
    node: Node, field: str, codes: set[int], value: str, caplog: pytest.LogCaptureFixture
) -> None:
    is_env = field.startswith(("CNI_", "K8S_"))
    with caplog.at_level(logging.WARNING):
        status, out = _add(node, {} if is_env else {field: value}, {field: value} if is_env else {})
    assert status == 1 and out is not None and out["code"] in codes, out
    assert len(json.dumps(out)) < 2000  # the value is named, not repeated
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert node.agent.nothing_written()
    assert [p for p in node.state.rglob("*") if not p.is_dir()] == []


RESOURCE_FIELDS = [
    ("v1", "Namespace", ["metadata", "name"]),
    ("v1", "Pod", ["metadata", "name"]),
    ("v1", "Pod", ["metadata", "namespace"]),
    ("v1", "Pod", ["metadata", "labels", "app"]),
    ("v1", "Pod", ["spec", "containers", 0, "name"]),
    ("v1", "Pod", ["spec", "containers", 0, "ports", 0, "name"]),
    ("v1", "Pod", ["spec", "containers", 0, "ports", 0, "protocol"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["metadata", "name"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["spec", "podSelector", "matchLabels", "app"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["spec", "ingress", 0, "ports", 0, "port"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["spec", "ingress", 0, "ports", 0, "protocol"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["spec", "ingress", 0, "from", 0, "ipBlock", "cidr"]),
    ("networking.k8s.io/v1", "NetworkPolicy", ["spec", "policyTypes", 0]),
    ("tulle.dev/v1", "IPPool", ["metadata", "name"]),
    ("tulle.dev/v1", "IPPool", ["spec", "cidr"]),
]


def _resource(api_version: str, kind: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ok", "labels": {"app": "web"}}
    specs: dict[str, Any] = {
        "Namespace": {},
        "Pod": {"containers": [{"name": "app", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}]},
        "NetworkPolicy": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"port": 80, "protocol": "TCP"}], "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
            "policyTypes": ["Ingress"],
        },
        "IPPool": {"cidr": "10.250.0.0/16"},
    }
    if kind in ("Pod", "NetworkPolicy"):
        meta["namespace"] = "default"
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": specs[kind]}


@pytest.mark.parametrize("value", NASTY, ids=["dotdot", "nul", "100KB"])
@pytest.mark.parametrize(
    ("api_version", "kind", "path"),
    RESOURCE_FIELDS,
    ids=[f"{k}-{'.'.join(map(str, p))}" for _, k, p in RESOURCE_FIELDS],
)
def test_every_identifying_resource_field_refuses_dotdot_nul_and_100kb(
    api_version: str, kind: str, path: list[Any], value: str
) -> None:
    from tulle.model.validation import AdmissionErrors, admit_all

    name = f"surfaces-admit-{os.getpid()}"
    server = memory_server(name)
    try:
        store = open_datastore(f"memory://{name}")
        obj = _resource(api_version, kind)
        assert store.apply_many([obj], admit=admit_all, dry_run=True)  # the object itself is fine
        target: Any = obj
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        before = (server.revision, dict(server.objects))
        with pytest.raises(AdmissionErrors):
            store.apply_many([obj], admit=admit_all)
        assert (server.revision, dict(server.objects)) == before
    finally:
        forget_server(name)


# -- no shell ----------------------------------------------------------------------------------


def test_no_string_reaches_a_shell() -> None:
    """Every process Tulle starts gets an argument list: no shell=True, os.system or os.popen."""
    found = []
    for folder, _dirs, files in os.walk(os.path.join(REPO, "src", "tulle")):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.keyword) and node.arg == "shell":
                    found.append(f"{path}:{node.value.lineno}: shell=")
                is_os = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                if is_os and node.attr in ("system", "popen", "spawnl", "spawnlp", "execl", "execlp"):
                    found.append(f"{path}:{node.lineno}: os.{node.attr}")
    assert found == []
