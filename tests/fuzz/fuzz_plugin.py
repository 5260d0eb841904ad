"""Fuzz the CNI plugin: `tulle.cni.plugin.run(command, env, stdin)` with fuzzed CNI_* variables,
a fuzzed network configuration on stdin (raw bytes, or a structured one with fuzzed fields), and
an agent socket that is a fake agent answering fuzzed bytes, a missing path, a socket that is
not root's, or a file that is not a socket.

Property: `run` returns (0 or 1, a JSON-serializable dict or None), a failure being the spec's
error object; it never raises. Nothing is written outside the harness's temporary directory: the
plugin's allowed roots are that directory alone, and a guard fails the run if a pending DEL is
about to be written anywhere else.

    python -m tests.fuzz.fuzz_plugin [CORPUS_DIR] -runs=100000
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from typing import Any

import atheris

with atheris.instrument_imports(include=["tulle"]):
    from tulle.cni import plugin, quickjson, spec

from tests.fuzz.values import Values, fuzz, scratch_dir

VERSIONS = list(spec.SUPPORTED_VERSIONS)
COMMANDS = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]
FOREIGN_UID = 4242  # a socket owned by someone other than root
ROOTS_ENV = "TULLE_CNI_PATH_ROOTS"  # plugin.PATH_ROOTS_ENV; spelt out so the harness also runs on older plugins


class FakeAgent:
    """Answers each connection with whatever the harness set in `answer` (None: close at once)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answer: bytes | None = b"{}"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.server.accept()
            try:
                answer = self.answer
                if answer is None:
                    continue  # closed without reading: the plugin meets EPIPE or a reset
                conn.settimeout(2)
                while conn.recv(1 << 16):
                    pass
                conn.sendall(answer)
            except OSError:
                pass  # the plugin gave up first: its business
            finally:
                conn.close()


class PluginHarness:
    def __init__(self) -> None:
        self.root = scratch_dir("tulle-fuzz-plugin-")
        self.agent = FakeAgent(os.path.join(self.root, "agent.sock"))
        self.missing = os.path.join(self.root, "missing.sock")
        self.not_a_socket = os.path.join(self.root, "regular-file")
        with open(self.not_a_socket, "w"):
            pass
        self.foreign = os.path.join(self.root, "foreign.sock")
        foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        foreign.bind(self.foreign)
        foreign.listen(1)
        self._keep = foreign
        if os.geteuid() == 0:
            os.chown(self.foreign, FOREIGN_UID, FOREIGN_UID)
        self.state = os.path.join(self.root, "state")
        self.blocked_state = os.path.join(self.not_a_socket, "state")  # a file in the way: cannot record
        # The plugin may use this directory alone: its defaults too point into it.
        plugin.DEFAULT_PATH_ROOTS = (self.root,)
        plugin.DEFAULT_SOCKET = self.missing
        plugin.DEFAULT_STATE_DIR = os.path.join(self.root, "default-state")
        plugin.AGENT_TIMEOUT_S = 2.0
        self._record = plugin.record_pending_del
        plugin.record_pending_del = self._guarded_record  # type: ignore[assignment]
        self.runs = 0

    def _guarded_record(self, state_dir: str, request: dict[str, Any]) -> str:
        real = os.path.realpath(state_dir)
        if not (real + "/").startswith(os.path.realpath(self.root) + "/"):
            raise AssertionError(f"the plugin was about to write a pending DEL outside its roots: {state_dir!r}")
        return self._record(state_dir, request)

    # -- the input ------------------------------------------------------------------------------

    def config(self, v: Values) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": v.string_or(VERSIONS),
            "name": v.string_or(["tulle", "net-1"]),
            "type": v.string_or(["tulle"]),
        }
        sockets = [self.agent.path] * 4 + [self.missing, self.foreign, self.not_a_socket]
        if v.chance(90):
            conf["agentSocket"] = v.maybe(v.string_or(sockets), 90)
        if v.chance(90):
            conf["stateDir"] = v.maybe(v.string_or([self.state, self.blocked_state, self.root + "/x/../state"]), 90)
        if v.chance(30):
            conf["mtu"] = v.maybe(v.fdp.ConsumeIntInRange(0, 70000), 70)
        if v.chance(30):
            conf["prevResult"] = v.maybe(self.result(v), 70)
        if v.chance(20):
            conf["cni.dev/valid-attachments"] = v.json(3)
        for _ in range(v.fdp.ConsumeIntInRange(0, 2)):
            conf[v.text(12)] = v.json(2)
        return conf

    def env(self, v: Values, command: str) -> dict[str, str]:
        env = {"CNI_COMMAND": command}
        for name, good in (
            ("CNI_CONTAINERID", ["ctr1", "a" * 64, "c.d_e-f"]),
            ("CNI_IFNAME", ["eth0", "net1"]),
            ("CNI_NETNS", ["/run/netns/pod", "/proc/1/ns/net"]),
            ("CNI_ARGS", ["IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=a", "", "K8S_POD_NAME=../x"]),
            ("CNI_PATH", ["/opt/cni/bin", "/opt/cni/bin:/usr/lib/cni"]),
        ):
            if v.chance(90):
                env[name] = v.string_or(good)
        if v.chance(20):
            # Roots the fuzzer may widen only within the scratch directory (or break).
            env[ROOTS_ENV] = v.pick([self.root, f"{self.root}/{v.text(20)}", v.text(20), ""])
        return env

    def result(self, v: Values) -> dict[str, Any]:
        """An ADD result, each part of it possibly of the wrong shape."""
        return {
            "cniVersion": v.maybe("1.1.0"),
            "interfaces": v.maybe(
                [{"name": v.maybe("eth0"), "mac": v.maybe("02:00:00:00:00:01"), "sandbox": v.json(1)}]
            ),
            "ips": v.maybe([{"address": v.maybe(v.string_or(["10.244.0.5/32", "fd00::5/128"])), "gateway": v.json(1)}]),
            "routes": v.maybe([{"dst": v.maybe("0.0.0.0/0"), "gw": v.json(1), "mtu": v.json(1)}]),
            "dns": v.maybe({}),
        }

    def agent_answer(self, v: Values) -> bytes | None:
        way = v.fdp.ConsumeIntInRange(0, 5)
        if way == 0:
            return None
        if way == 1:
            return v.fdp.ConsumeBytes(v.fdp.ConsumeIntInRange(0, 300))
        if way == 2:
            error = {"code": v.maybe(v.fdp.ConsumeIntInRange(-2, 200)), "msg": v.maybe("no"), "details": v.maybe("x")}
            return json.dumps({"error": v.maybe(error)}).encode()
        if way == 3:
            return json.dumps(v.json(4)).encode()
        return json.dumps({"result": self.result(v) if v.chance(80) else v.json(3)}).encode()

    # -- one execution --------------------------------------------------------------------------

    def one_input(self, data: bytes) -> None:
        v = Values(atheris.FuzzedDataProvider(data))
        command = v.string_or(COMMANDS, 12)
        if v.chance(20):
            stdin = v.fdp.ConsumeBytes(v.fdp.ConsumeIntInRange(0, 2000))
        else:
            stdin = json.dumps(self.config(v)).encode()
        env = self.env(v, command)
        self.agent.answer = self.agent_answer(v)
        status, out = plugin.run(command, env, stdin)
        check_outcome(status, out)
        self.runs += 1
        if self.runs % 2000 == 0:
            self.sweep()

    def sweep(self) -> None:
        """Remove what DELs recorded (and the directories fuzzed stateDirs made) now and then."""
        keep = {os.path.basename(p) for p in (self.agent.path, self.missing, self.foreign, self.not_a_socket)}
        for name in os.listdir(self.root):
            if name not in keep:
                path = os.path.join(self.root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def check_outcome(status: int, out: dict[str, Any] | None) -> None:
    """What a runtime may rely on: an exit status, and the spec's JSON (a result or an error)."""
    assert status in (0, 1), status
    if out is None:
        assert status == 0
        return
    assert isinstance(out, dict), out
    assert quickjson.dumps(out) == json.dumps(out)  # printable, as main() prints it
    assert out.get("cniVersion") in spec.SUPPORTED_VERSIONS, out
    if status == 1:
        assert isinstance(out.get("code"), int) and not isinstance(out["code"], bool), out
        assert isinstance(out.get("msg"), str) and isinstance(out.get("details", ""), str), out


def main() -> None:
    fuzz(PluginHarness)


if __name__ == "__main__":
    main()
