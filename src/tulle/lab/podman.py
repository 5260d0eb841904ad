"""Podman as the lab's second runtime: a real CNI client (podman 4.3's CNI backend) started
inside a node's namespace with `nsenter --net` (ip netns exec would remount /sys and break
podman's cgroups), with its configuration and storage kept in the lab's folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from tulle.lab import state as lab_state

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "sleep", "ip", "ping", "nc", "wget", "cat", "ls", "echo", "true", "hostname", "ifconfig"]


class PodmanError(Exception):
    pass


def make_rootfs(path: str) -> str:
    """A root filesystem with busybox: no image registry is reachable here."""
    if os.path.exists(os.path.join(path, "bin", "busybox")):
        return path
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "run", "var"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    for applet in APPLETS:
        link = os.path.join(path, "bin", applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    return path


class Podman:
    """podman for one lab node: its own config, storage and CNI network configuration."""

    def __init__(self, node_dir: str, node_netns: str, cni_conf_dir: str, cni_plugin_dirs: list[str]) -> None:
        self.dir = os.path.join(node_dir, "podman")
        self.node_netns = node_netns
        self.conf = os.path.join(self.dir, "containers.conf")
        self.storage_conf = os.path.join(self.dir, "storage.conf")
        os.makedirs(self.dir, exist_ok=True)
        plugin_dirs = ", ".join(json.dumps(d) for d in cni_plugin_dirs)
        with open(self.conf, "w") as f:
            f.write(
                "[containers]\n"
                'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
                "[engine]\n"
                'runtime = "runc"\n'
                'cgroup_manager = "cgroupfs"\n'
                'events_logger = "file"\n'
                f'events_logfile_path = "{self.dir}/events.log"\n'
                "[network]\n"
                'network_backend = "cni"\n'
                f"cni_plugin_dirs = [{plugin_dirs}]\n"
                f'network_config_dir = "{cni_conf_dir}"\n'
            )
        with open(self.storage_conf, "w") as f:
            f.write(f'[storage]\ndriver = "vfs"\ngraphroot = "{self.dir}/storage"\nrunroot = "{self.dir}/run"\n')

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            CONTAINERS_CONF=self.conf,
            CONTAINERS_STORAGE_CONF=self.storage_conf,
            **lab_state.plugin_environment(),  # podman hands its environment to the plugins
        )
        cmd = ["nsenter", f"--net=/run/netns/{self.node_netns}", "podman", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if check and proc.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def start(self, name: str, network: str, rootfs: str) -> dict[str, Any]:
        self.run("run", "-d", "--name", name, "--network", network, "--rootfs", rootfs, "/bin/sleep", "1000000")
        return self.inspect(name)

    def inspect(self, name: str) -> dict[str, Any]:
        data = json.loads(self.run("inspect", name).stdout)
        info: dict[str, Any] = data[0]
        return info

    def remove(self, name: str) -> None:
        self.run("rm", "-f", "-t", "0", name, check=False)

    def remove_all(self) -> None:
        """Remove every container of this node's podman, whether or not a record names it."""
        self.run("rm", "--all", "-f", "-t", "0", check=False)

    def names(self) -> list[str]:
        proc = self.run("ps", "-a", "--format", "{{.Names}}", check=False)
        return [line for line in proc.stdout.split() if line]
