"""A small CNI runtime, as libcni does it: runs a conflist's plugins in order for ADD (each
getting the previous result), in reverse for DEL, and caches the result for DEL and CHECK.
The lab uses it to create pods the way a container runtime does."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from tulle.lab import state as lab_state


class CniFailure(Exception):
    def __init__(self, plugin: str, command: str, error: dict[str, Any], status: int) -> None:
        self.plugin = plugin
        self.command = command
        self.error = error
        self.status = status
        msg = error.get("msg", "")
        details = error.get("details", "")
        super().__init__(
            f"{plugin} {command} failed (code {error.get('code')}): {msg}" + (f" ({details})" if details else "")
        )


@dataclass
class Invocation:
    """One run of one plugin binary."""

    status: int
    stdout: bytes
    stderr: bytes
    seconds: float


def exec_plugin(
    plugin_type: str,
    command: str,
    config: dict[str, Any],
    *,
    cni_path: list[str],
    container_id: str = "",
    netns: str = "",
    ifname: str = "",
    args: str = "",
    host_netns: str | None = None,
) -> Invocation:
    """Run one plugin as the CNI spec says: the command in the environment, the config on stdin."""
    binary = next(
        (os.path.join(d, plugin_type) for d in cni_path if os.path.exists(os.path.join(d, plugin_type))), None
    )
    if binary is None:
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {':'.join(cni_path)}")
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": ":".join(cni_path),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        **lab_state.plugin_environment(),
    }
    cmd = [binary]
    if host_netns:
        cmd = ["nsenter", f"--net={host_netns}", binary]
    started = time.perf_counter()
    proc = subprocess.run(cmd, input=json.dumps(config).encode(), env=env, capture_output=True, timeout=120)
    return Invocation(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)


def _plugin_config(conflist: dict[str, Any], plugin: dict[str, Any], runtime_config: dict[str, Any]) -> dict[str, Any]:
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    wanted = {k for k, v in plugin.get("capabilities", {}).items() if v}
    rc = {k: v for k, v in runtime_config.items() if k in wanted}
    if rc:
        conf["runtimeConfig"] = rc
    return conf


class CniRuntime:
    """Runs conflists for containers on one host (a lab node's namespace)."""

    def __init__(self, cni_path: list[str], host_netns: str | None = None) -> None:
        self.cni_path = cni_path
        self.host_netns = host_netns

    def _run(
        self,
        plugin: dict[str, Any],
        command: str,
        conf: dict[str, Any],
        container_id: str,
        netns: str,
        ifname: str,
        args: str,
    ) -> dict[str, Any] | None:
        inv = exec_plugin(
            plugin["type"],
            command,
            conf,
            cni_path=self.cni_path,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=args,
            host_netns=self.host_netns,
        )
        out: dict[str, Any] | None = json.loads(inv.stdout) if inv.stdout.strip() else None
        if inv.status != 0:
            raise CniFailure(plugin["type"], command, out or {"msg": inv.stderr.decode(errors="replace")}, inv.status)
        return out

    def add(
        self,
        conflist: dict[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: str = "",
        runtime_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            conf = _plugin_config(conflist, plugin, runtime_config or {})
            if prev is not None:
                conf["prevResult"] = prev
            result = self._run(plugin, "ADD", conf, container_id, netns, ifname, args)
            if result is not None:
                prev = result
        if prev is None:
            raise CniFailure(conflist["plugins"][-1]["type"], "ADD", {"msg": "no result"}, 0)
        return prev

    def delete(
        self,
        conflist: dict[str, Any],
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: str = "",
        prev_result: dict[str, Any] | None = None,
        runtime_config: dict[str, Any] | None = None,
    ) -> None:
        for plugin in reversed(conflist["plugins"]):
            conf = _plugin_config(conflist, plugin, runtime_config or {})
            if prev_result is not None:
                conf["prevResult"] = prev_result
            self._run(plugin, "DEL", conf, container_id, netns, ifname, args)

    def check(
        self,
        conflist: dict[str, Any],
        container_id: str,
        netns: str,
        prev_result: dict[str, Any],
        ifname: str = "eth0",
        args: str = "",
    ) -> None:
        for plugin in conflist["plugins"]:
            conf = _plugin_config(conflist, plugin, {})
            conf["prevResult"] = prev_result
            self._run(plugin, "CHECK", conf, container_id, netns, ifname, args)
