"""`tulle lab up NAME --kubernetes`: upstream Kubernetes in the lab.

On top of the etcd lab (underlay, etcd with TLS, one Tulle agent per node), this starts:

- in the underlay namespace, next to etcd: kube-apiserver (IPv4 and IPv6 service ranges, bound
  to etcd's underlay address, which every node reaches), kube-controller-manager and
  kube-scheduler, with certificates from the lab's CA and an admin kubeconfig;
- in each node's namespace: a containerd of its own (root, state, sockets, runc root under the
  node's folder) with the images of tulle.lab.images imported, and a kubelet with its own
  --root-dir, podLogsDir, and a cgroup root of its own made beforehand in every v1 hierarchy;
  Tulle's plugin is the node's only CNI network, so the kubelet calls Tulle for every pod.

Every process is started by nsenter (which execs it: the PID recorded is the process's) and
stopped by that PID. `down` stops pods (through the API, so the kubelet calls CNI DEL) before
the kubelets, the kubelets before containerd, containerd before the control plane, then
unmounts what is left under the lab's folder and removes the cgroup roots. Tulle's agents keep
using the lab's etcd datastore in this first step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tulle.cni.conflist import conflist, write_conflist
from tulle.lab import images, pki
from tulle.lab import state as lab_state
from tulle.lab.etcd_server import runs_as, stop_pid

APISERVER_PORT = 6443
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:10:96::/112")
KUBERNETES_SERVICE_IPS = ("10.96.0.1", "fd00:10:96::1")
CLUSTER_DNS = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = "/sys/fs/cgroup"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
CNI_HELPERS = ("loopback", "portmap", "bandwidth")  # the runtime sets lo up with `loopback`


class KubernetesError(Exception):
    """The Kubernetes part of a lab cannot be made: binaries missing, a component that dies."""


# -- places -------------------------------------------------------------------------------------


def kube_dir(lab_dir: str) -> str:
    return os.path.join(lab_dir, "kubernetes")


def kubeconfig_path(lab_dir: str) -> str:
    """The admin's kubeconfig (`tulle lab kubeconfig NAME`)."""
    return os.path.join(kube_dir(lab_dir), "admin.kubeconfig")


def node_paths(node_dir: str) -> dict[str, str]:
    """A node's own folders and sockets: nothing of one node's runtime is shared with another's."""
    k = os.path.join(node_dir, "k8s")
    return {
        "dir": k,
        "containerdConfig": os.path.join(k, "containerd.toml"),
        "containerdRoot": os.path.join(k, "containerd", "root"),
        "containerdState": os.path.join(k, "containerd", "state"),
        "containerdSocket": os.path.join(k, "containerd", "containerd.sock"),
        "runcRoot": os.path.join(k, "runc"),
        "cniBin": os.path.join(k, "cni-bin"),
        "cniConf": os.path.join(k, "cni-conf"),
        "kubeletRoot": os.path.join(k, "kubelet"),
        "kubeletConfig": os.path.join(k, "kubelet.yaml"),
        "kubeconfig": os.path.join(k, "kubelet.kubeconfig"),
        "podLogs": os.path.join(k, "pod-logs"),
        "resolvConf": os.path.join(k, "resolv.conf"),
        "containerdLog": os.path.join(k, "containerd.log"),
        "kubeletLog": os.path.join(k, "kubelet.log"),
    }


def cgroup_root(lab: str, node: str) -> str:
    """The node's kubelet cgroupRoot: one per node, or each kubelet kills the other's containers."""
    return f"/tulle-{lab}-{node}"


# -- configuration (pure) -----------------------------------------------------------------------


def containerd_config(paths: dict[str, str]) -> str:
    """containerd 1.6 (config version 2) with everything under the node's folder."""
    sock = paths["containerdSocket"]
    return f"""version = 2
root = "{paths["containerdRoot"]}"
state = "{paths["containerdState"]}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{sock}.debug"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  # The sandbox asks for oom_score_adj -998, which this machine refuses even to root (runc's
  # init dies: "failed to update /proc/self/oom_score_adj: Permission denied"); clamp to
  # containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{paths["cniBin"]}"
    conf_dir = "{paths["cniConf"]}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{paths["runcRoot"]}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{os.path.join(paths["dir"], "containerd", "opt")}"
"""


def kubelet_config(paths: dict[str, str], node_ip: str, cgroup: str, ca: str) -> dict[str, Any]:
    """The KubeletConfiguration for a node of this cgroup-v1, non-systemd machine."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "x509": {"clientCAFile": ca},
            "webhook": {"enabled": False},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup,
        "cgroupsPerQOS": True,
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{paths['containerdSocket']}",
        "podLogsDir": paths["podLogs"],
        "resolvConf": paths["resolvConf"],
        "clusterDNS": [CLUSTER_DNS],
        "clusterDomain": CLUSTER_DOMAIN,
        "enforceNodeAllocatable": ["pods"],
        # A lab on a small disk must not evict its pods or collect their images.
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "registerNode": True,
        "maxPods": 110,
    }


def kubeconfig(server: str, ca: str, cert: str, key: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
        "current-context": "lab",
    }


def apiserver_args(d: str, address: str, etcd_url: str, dual_stack: bool) -> list[str]:
    cidrs = ",".join(SERVICE_CIDRS if dual_stack else SERVICE_CIDRS[:1])
    return [
        f"--advertise-address={address}",
        f"--bind-address={address}",
        f"--secure-port={APISERVER_PORT}",
        f"--etcd-servers={etcd_url}",
        f"--etcd-cafile={d}/ca.crt",
        f"--etcd-certfile={d}/etcd-client.crt",
        f"--etcd-keyfile={d}/etcd-client.key",
        "--etcd-prefix=/kubernetes.io",
        f"--service-cluster-ip-range={cidrs}",
        f"--client-ca-file={d}/ca.crt",
        f"--tls-cert-file={d}/apiserver.crt",
        f"--tls-private-key-file={d}/apiserver.key",
        f"--kubelet-client-certificate={d}/apiserver-kubelet-client.crt",
        f"--kubelet-client-key={d}/apiserver-kubelet-client.key",
        "--kubelet-preferred-address-types=InternalIP",  # no DNS names the nodes by
        f"--service-account-key-file={d}/sa.pub",
        f"--service-account-signing-key-file={d}/sa.key",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_args(d: str, dual_stack: bool) -> list[str]:
    cidrs = ",".join(SERVICE_CIDRS if dual_stack else SERVICE_CIDRS[:1])
    return [
        f"--kubeconfig={d}/controller-manager.kubeconfig",
        f"--authentication-kubeconfig={d}/controller-manager.kubeconfig",
        f"--authorization-kubeconfig={d}/controller-manager.kubeconfig",
        "--bind-address=127.0.0.1",
        f"--service-cluster-ip-range={cidrs}",
        "--allocate-node-cidrs=false",
        f"--cluster-signing-cert-file={d}/ca.crt",
        f"--cluster-signing-key-file={d}/ca.key",
        f"--root-ca-file={d}/ca.crt",
        f"--service-account-private-key-file={d}/sa.key",
        "--use-service-account-credentials=true",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_args(d: str) -> list[str]:
    return [
        f"--kubeconfig={d}/scheduler.kubeconfig",
        f"--authentication-kubeconfig={d}/scheduler.kubeconfig",
        f"--authorization-kubeconfig={d}/scheduler.kubeconfig",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


# -- certificates -------------------------------------------------------------------------------


def _issue(ca: pki.Authority, base: str, subject: str, *, server_sans: list[str] | None = None) -> None:
    """A key and certificate (`base`.key, `base`.crt) signed by the lab's CA; with `server_sans`
    a server's for those names (IP:... or DNS:...), else a client's."""
    usage = "serverAuth,clientAuth" if server_sans else "clientAuth"
    args = [
        "openssl", "req", "-x509", "-config", ca.config,
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{base}.key", "-out", f"{base}.crt", "-subj", subject, "-days", str(pki.DAYS),
        "-CA", ca.cert, "-CAkey", ca.key,
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", f"extendedKeyUsage={usage}",
    ]  # fmt: skip
    if server_sans:
        args += ["-addext", "subjectAltName=" + ",".join(server_sans)]
    subprocess.run(args, check=True, capture_output=True)
    os.chmod(f"{base}.key", 0o600)


def make_pki(ca: pki.Authority, d: str, address: str, nodes: list[str]) -> None:
    """The control plane's certificates, in `d` (0700) with a copy of the CA (its key too: the
    controller-manager signs kubelet certificates with it)."""
    os.makedirs(d, mode=0o700, exist_ok=True)
    shutil.copyfile(ca.cert, os.path.join(d, "ca.crt"))
    shutil.copyfile(ca.key, os.path.join(d, "ca.key"))
    os.chmod(os.path.join(d, "ca.key"), 0o600)
    sans = [f"IP:{address}", "IP:127.0.0.1", *(f"IP:{ip}" for ip in KUBERNETES_SERVICE_IPS)]
    sans += [f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}", "DNS:kubernetes.default.svc", "DNS:kubernetes"]
    _issue(ca, f"{d}/apiserver", "/CN=kube-apiserver", server_sans=sans)
    # etcd runs with authentication on: a client certificate's Common Name is its etcd user.
    _issue(ca, f"{d}/etcd-client", "/CN=root")
    _issue(ca, f"{d}/apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
    _issue(ca, f"{d}/admin", "/O=system:masters/CN=kubernetes-admin")
    _issue(ca, f"{d}/controller-manager", "/CN=system:kube-controller-manager")
    _issue(ca, f"{d}/scheduler", "/CN=system:kube-scheduler")
    for node in nodes:
        _issue(ca, f"{d}/kubelet-{node}", f"/O=system:nodes/CN=system:node:{node}")
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", f"{d}/sa.key"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["openssl", "pkey", "-in", f"{d}/sa.key", "-pubout", "-out", f"{d}/sa.pub"], check=True)
    os.chmod(f"{d}/sa.key", 0o600)


def _write_json(path: str, data: dict[str, Any]) -> None:
    # JSON is YAML: kubeconfigs and the kubelet's configuration need no YAML writer.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)


# -- processes ----------------------------------------------------------------------------------


def _start(netns: str, argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
    """Start argv in `netns` (nsenter execs it: the PID is the process's own), output to `log`."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return proc.pid


def _stop(pid: int, expect: str) -> None:
    if runs_as(pid, expect):
        stop_pid(pid, expect=expect)


def _wait(what: str, check: Callable[[], bool], timeout: float, pid: int = 0, expect: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid and not runs_as(pid, expect):
            raise KubernetesError(f"{what}: the process exited (see its log)")
        time.sleep(0.5)
    raise KubernetesError(f"{what}: not ready within {timeout:.0f} s")


def kubectl(lab_dir: str, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """kubectl as the lab's admin, run in the underlay namespace, where the API server listens."""
    netns = lab_state.load(os.path.basename(lab_dir))["underlay"]["netns"]
    cmd = ["nsenter", f"--net=/run/netns/{netns}", kubectl_binary(), f"--kubeconfig={kubeconfig_path(lab_dir)}"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, check=check)


def kubectl_binary() -> str:
    return os.path.join(images.bin_dir(), "kubectl")


def binaries_missing() -> list[str]:
    names = [*COMPONENTS, "kubelet", "kubectl", "pause", "agnhost", "coredns"]
    return [n for n in names if not os.access(os.path.join(images.bin_dir(), n), os.X_OK)]


# -- cgroups ------------------------------------------------------------------------------------


def _hierarchies() -> list[str]:
    try:
        return sorted(os.path.join(CGROUP_ROOT, h) for h in os.listdir(CGROUP_ROOT))
    except FileNotFoundError:
        return []


def make_cgroup_root(cgroup: str) -> None:
    """The node's cgroup root in every hierarchy, cpuset's with the parent's cpus and mems."""
    for h in _hierarchies():
        path = h + cgroup
        os.makedirs(path, exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            parent = os.path.join(h, name)
            if os.path.exists(parent) and os.path.exists(os.path.join(path, name)):
                with open(parent) as f:
                    value = f.read().strip()
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)


def remove_cgroup_root(cgroup: str) -> list[str]:
    """Remove the node's cgroup tree (deepest first) in every hierarchy; what could not go."""
    left: list[str] = []
    for h in _hierarchies():
        top = h + cgroup
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    return left


def unmount_under(directory: str) -> None:
    """Unmount everything mounted under `directory` (deepest first, lazily)."""
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# -- up -----------------------------------------------------------------------------------------


def up(lab: Any, state: dict[str, Any], progress: Callable[[str], None] = lambda _m: None) -> None:
    """Add the Kubernetes control plane and each node's containerd and kubelet to a lab that is up
    (`lab` is a tulle.lab.cluster.Lab). Records every PID in `state` as it starts it."""
    missing = binaries_missing()
    if missing:
        raise KubernetesError(f"Kubernetes binaries not built ({', '.join(missing)}): run scripts/build-kubernetes")
    progress("images")
    tars = images.ensure_images()
    d = kube_dir(lab.dir)
    address = state["etcd"]["url"].split("//", 1)[1].rsplit(":", 1)[0]
    dual = not state.get("ipv4Only")
    k8s: dict[str, Any] = {"dir": d, "address": address, "server": f"https://{address}:{APISERVER_PORT}"}
    k8s["nodes"] = {}
    state["kubernetes"] = k8s
    lab_state.save(lab.name, state)
    progress("Kubernetes certificates")
    nodes = sorted(state["nodes"])
    make_pki(lab._authority(), d, address, nodes)
    server, ca = k8s["server"], f"{d}/ca.crt"
    for user, base in (("admin", "admin"), ("controller-manager", "controller-manager"), ("scheduler", "scheduler")):
        path = kubeconfig_path(lab.dir) if user == "admin" else f"{d}/{user}.kubeconfig"
        _write_json(path, kubeconfig(server, ca, f"{d}/{base}.crt", f"{d}/{base}.key", user))
    binaries = images.bin_dir()
    underlay = state["underlay"]["netns"]
    progress("kube-apiserver")
    argv = [os.path.join(binaries, "kube-apiserver"), *apiserver_args(d, address, state["etcd"]["url"], dual)]
    k8s["apiserver"] = _start(underlay, argv, f"{d}/kube-apiserver.log")
    lab_state.save(lab.name, state)
    _wait(
        "kube-apiserver",
        lambda: kubectl(lab.dir, "get", "--raw=/readyz", check=False, timeout=10).returncode == 0,
        120,
        k8s["apiserver"],
        "kube-apiserver",
    )
    progress("kube-controller-manager, kube-scheduler")
    argv = [os.path.join(binaries, "kube-controller-manager"), *controller_manager_args(d, dual)]
    k8s["controllerManager"] = _start(underlay, argv, f"{d}/kube-controller-manager.log")
    argv = [os.path.join(binaries, "kube-scheduler"), *scheduler_args(d)]
    k8s["scheduler"] = _start(underlay, argv, f"{d}/kube-scheduler.log")
    lab_state.save(lab.name, state)
    for node in nodes:
        progress(f"containerd and kubelet on {node}")
        start_node(lab, state, node, tars)
    progress("waiting for the nodes and the default ServiceAccount")
    _wait(
        "nodes Ready",
        lambda: _ready_nodes(lab.dir) >= set(nodes),
        120,
    )
    _wait(
        "the default ServiceAccount",
        lambda: kubectl(lab.dir, "get", "serviceaccount", "default", check=False, timeout=10).returncode == 0,
        60,
    )


def _ready_nodes(lab_dir: str) -> set[str]:
    out = kubectl(lab_dir, "get", "nodes", "-o", "json", check=False, timeout=10)
    if out.returncode != 0:
        return set()
    ready = set()
    for item in json.loads(out.stdout).get("items", []):
        for cond in item.get("status", {}).get("conditions", []):
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                ready.add(item["metadata"]["name"])
    return ready


def start_node(lab: Any, state: dict[str, Any], node: str, tars: dict[str, str]) -> None:
    """The node's containerd (images imported) and kubelet, with Tulle as its CNI."""
    k8s = state["kubernetes"]
    d = k8s["dir"]
    record = state["nodes"][node]
    paths = node_paths(lab.node_dir(node))
    for key in ("containerdRoot", "containerdState", "runcRoot", "kubeletRoot", "podLogs"):
        os.makedirs(paths[key], exist_ok=True)
    # Tulle as the node's CNI, as `tulle install-cni` puts it on a host: the plugin in the
    # node's bin dir (with the reference loopback the runtime needs), its conflist alone in the
    # node's conf dir.
    os.makedirs(paths["cniBin"], exist_ok=True)
    subprocess.run(
        [
            *lab_state_python(),
            "install-cni",
            f"--bin-dir={paths['cniBin']}",
            f"--conf-dir={paths['cniConf']}",
            f"--socket={lab.agent_socket(node)}",
            f"--state-dir={os.path.join(lab.node_dir(node), 'state')}",
        ],
        check=True,
        capture_output=True,
    )
    for helper in CNI_HELPERS:
        target = os.path.join(paths["cniBin"], helper)
        if not os.path.exists(target) and os.path.exists(f"/usr/lib/cni/{helper}"):
            os.symlink(f"/usr/lib/cni/{helper}", target)
    if not os.listdir(paths["cniConf"]):  # install-cni wrote it; never run without one
        write_conflist(paths["cniConf"], conflist("tulle", lab.agent_socket(node), lab.node_dir(node)))
    with open(paths["containerdConfig"], "w") as f:
        f.write(containerd_config(paths))
    with open(paths["resolvConf"], "w") as f:
        f.write("nameserver 127.0.0.1\n")
    cgroup = cgroup_root(lab.name, node)
    make_cgroup_root(cgroup)
    node_k8s: dict[str, Any] = {"cgroupRoot": cgroup, "paths": paths}
    k8s["nodes"][node] = node_k8s
    netns = record["netns"]
    node_k8s["containerd"] = _start(
        netns,
        ["containerd", "--config", paths["containerdConfig"]],
        paths["containerdLog"],
        env=lab_state.plugin_environment(),  # containerd hands its environment to the plugins
    )
    lab_state.save(lab.name, state)
    sock = paths["containerdSocket"]
    _wait("containerd", lambda: os.path.exists(sock), 30, node_k8s["containerd"], "containerd")
    for tar in tars.values():
        subprocess.run(["ctr", "-a", sock, "-n", "k8s.io", "images", "import", tar], check=True, capture_output=True)
    v4, v6 = record["addresses"]
    _write_json(paths["kubeletConfig"], kubelet_config(paths, v4, cgroup, f"{d}/ca.crt"))
    _write_json(
        paths["kubeconfig"],
        kubeconfig(k8s["server"], f"{d}/ca.crt", f"{d}/kubelet-{node}.crt", f"{d}/kubelet-{node}.key", node),
    )
    node_ips = v4 if state.get("ipv4Only") else f"{v4},{v6}"
    argv = [
        os.path.join(images.bin_dir(), "kubelet"),
        f"--config={paths['kubeletConfig']}",
        f"--kubeconfig={paths['kubeconfig']}",
        f"--root-dir={paths['kubeletRoot']}",
        f"--cert-dir={os.path.join(paths['dir'], 'kubelet-pki')}",
        f"--hostname-override={node}",
        f"--node-ip={node_ips}",
        "--v=1",
    ]
    node_k8s["kubelet"] = _start(netns, argv, paths["kubeletLog"])
    lab_state.save(lab.name, state)


def lab_state_python() -> list[str]:
    import sys

    return [sys.executable, "-m", "tulle.cli.main"]


# -- down ---------------------------------------------------------------------------------------


def down(lab_dir: str, state: dict[str, Any], progress: Callable[[str], None] = lambda _m: None) -> None:
    """Stop what `up` started: pods first (deleted through the API, so each kubelet calls CNI
    DEL while the agents run), then the kubelets, then containerd (and what is left of its
    containers), then the control plane; unmount what is left under the lab's folder; remove
    each node's cgroup root. The caller stops the agents and etcd afterwards."""
    k8s = state.get("kubernetes")
    if not k8s:
        return
    nodes: dict[str, Any] = k8s.get("nodes", {})
    if runs_as(int(k8s.get("apiserver") or 0), "kube-apiserver"):
        progress("pods")
        kubectl(lab_dir, "delete", "pods", "--all", "-A", "--wait=false", check=False, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = kubectl(lab_dir, "get", "pods", "-A", "-o", "name", check=False, timeout=10)
            if out.returncode == 0 and not out.stdout.strip():
                break
            time.sleep(1)
    for node, rec in sorted(nodes.items()):
        progress(f"kubelet on {node}")
        _stop(int(rec.get("kubelet") or 0), "kubelet")
    for node, rec in sorted(nodes.items()):
        sock = rec.get("paths", {}).get("containerdSocket", "")
        if runs_as(int(rec.get("containerd") or 0), "containerd") and sock:
            progress(f"containers left on {node}")
            _remove_tasks(sock)
        progress(f"containerd on {node}")
        _stop(int(rec.get("containerd") or 0), "containerd")
    for key, expect in (("scheduler", "kube-scheduler"), ("controllerManager", "kube-controller-manager")):
        _stop(int(k8s.get(key) or 0), expect)
    _stop(int(k8s.get("apiserver") or 0), "kube-apiserver")
    progress("mounts")
    unmount_under(lab_dir)
    for rec in nodes.values():
        if rec.get("cgroupRoot"):
            remove_cgroup_root(rec["cgroupRoot"])


def _remove_tasks(sock: str) -> None:
    """Kill and delete every container task containerd still runs (pods the API did not stop)."""
    base = ["ctr", "-a", sock, "-n", "k8s.io"]
    out = subprocess.run([*base, "tasks", "ls", "-q"], capture_output=True, text=True, timeout=30)
    for task in out.stdout.split():
        subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, timeout=30)
    time.sleep(0.5)
    for task in out.stdout.split():
        subprocess.run([*base, "tasks", "delete", "-f", task], capture_output=True, timeout=30)
