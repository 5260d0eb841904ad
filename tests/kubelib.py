"""A real kube-apiserver for tests, on loopback, storing in the session's real etcd under a
prefix of its own: its serving certificate, a service-account key pair and an admin (group
system:masters) client certificate from the session's CA, and an admin kubeconfig. Never a mock.

Admission differs from a cluster's on purpose: NamespaceLifecycle, PodSecurity, LimitRanger,
ResourceQuota (each looks the namespace up) and ServiceAccount are off, because the datastore
contract suite writes Pods into namespaces it has not made (as it does on etcd) and no
controller-manager runs here to make service accounts."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass

from tulle.datastore.base import Datastore
from tulle.datastore.kubeconfig import write_kubeconfig
from tulle.datastore.kubernetes import LEASE_NAMESPACE, KubernetesDatastore
from tulle.lab import pki
from tulle.lab.etcd_server import EtcdServer, free_port, stop_pid
from tulle.model.kinds import KINDS, NAMESPACE

KUBERNETES_VERSION = "v1.37.2"


def kubernetes_bin_dir() -> str:
    """Where scripts/build-kubernetes puts the upstream binaries."""
    cache = os.environ.get("TULLE_CACHE", "/var/cache/tulle")
    return os.path.join(cache, "kubernetes", KUBERNETES_VERSION, "bin")


def missing_binaries() -> str:
    """'' when the binaries the tests need are built; otherwise why the tests are skipped."""
    path = os.path.join(kubernetes_bin_dir(), "kube-apiserver")
    if os.access(path, os.X_OK):
        return ""
    return f"{path} is not built: run scripts/build-kubernetes (~30 min cold, ~1 min warm)"


@dataclass
class ApiServer:
    pid: int
    url: str
    kubeconfig: str
    args: list[str]
    log_path: str
    etcd_prefix: str
    ca: str
    admin_cert: str
    admin_key: str


def _service_account_keys(work: str) -> tuple[str, str]:
    key, pub = os.path.join(work, "sa.key"), os.path.join(work, "sa.pub")
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return key, pub


def start_apiserver(ca: pki.Authority, etcd: EtcdServer, work: str, etcd_prefix: str | None = None) -> ApiServer:
    """Start kube-apiserver and wait until /readyz answers; the caller stops it by PID. Given
    another's `etcd_prefix`, it serves the same objects (as the API servers of an HA cluster)."""
    assert etcd.client_tls is not None
    os.makedirs(work, exist_ok=True)
    serving_cert, serving_key = os.path.join(work, "apiserver.crt"), os.path.join(work, "apiserver.key")
    pki.issue(ca, serving_cert, serving_key, "/O=tulle/OU=test kube-apiserver", server_ip="127.0.0.1")
    admin_cert, admin_key = os.path.join(work, "admin.crt"), os.path.join(work, "admin.key")
    pki.issue(ca, admin_cert, admin_key, "/O=system:masters/CN=tulle-test-admin")
    sa_key, sa_pub = _service_account_keys(work)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    etcd_prefix = etcd_prefix or f"/kube-{uuid.uuid4().hex[:8]}"
    args = [
        os.path.join(kubernetes_bin_dir(), "kube-apiserver"),
        "--etcd-servers", etcd.url,
        "--etcd-cafile", etcd.client_tls.ca,
        "--etcd-certfile", etcd.client_tls.cert,
        "--etcd-keyfile", etcd.client_tls.key,
        "--etcd-prefix", etcd_prefix,
        "--bind-address", "127.0.0.1",
        "--advertise-address", "127.0.0.1",
        "--secure-port", str(port),
        "--tls-cert-file", serving_cert,
        "--tls-private-key-file", serving_key,
        "--client-ca-file", ca.cert,
        "--service-account-key-file", sa_pub,
        "--service-account-signing-key-file", sa_key,
        "--service-account-issuer", "https://kubernetes.default.svc",
        "--service-cluster-ip-range", "10.96.0.0/16,fd00:10:96::/112",
        # the `kubernetes` Service's endpoints cannot be a loopback address (PLATFORM.md)
        "--endpoint-reconciler-type", "none",
        "--authorization-mode", "RBAC,Node",
        "--disable-admission-plugins", "NamespaceLifecycle,ServiceAccount,PodSecurity,LimitRanger,ResourceQuota",
        "--enable-priority-and-fairness=false",  # one client: nothing to share fairly; saves CPU
        "--profiling=false",
        "--v", "1",
    ]  # fmt: skip
    log_path = os.path.join(work, "kube-apiserver.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    kubeconfig = os.path.join(work, "admin.kubeconfig")
    write_kubeconfig(kubeconfig, url, ca.cert, admin_cert, admin_key)
    server = ApiServer(proc.pid, url, kubeconfig, args, log_path, etcd_prefix, ca.cert, admin_cert, admin_key)
    try:
        wait_ready(server, ca.cert, admin_cert, admin_key, proc)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return server


def restart_apiserver(server: ApiServer) -> int:
    """Start a stopped API server again with the same flags (port, etcd prefix); its new PID."""
    with open(server.log_path, "ab") as log:
        proc = subprocess.Popen(
            server.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server.pid = proc.pid
    try:
        wait_ready(server, server.ca, server.admin_cert, server.admin_key, proc)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return proc.pid


def wait_ready(
    server: ApiServer, ca: str, cert: str, key: str, proc: subprocess.Popen[bytes] | None, timeout: float = 90
) -> None:
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited with status {proc.returncode}; see {server.log_path}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", context=context, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"kube-apiserver did not get ready at {server.url} within {timeout:.0f} s ({last}); see {server.log_path}"
    )


# What the API server makes itself, and Tulle's own: left alone between tests.
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease", LEASE_NAMESPACE})


def unreachable_kubeconfig(server: ApiServer, directory: str) -> str:
    """A kubeconfig with the admin's credential for a port where nothing listens."""
    path = os.path.join(directory, f"unreachable-{uuid.uuid4().hex[:8]}.kubeconfig")
    write_kubeconfig(path, f"https://127.0.0.1:{free_port()}", server.ca, server.admin_cert, server.admin_key)
    return path


def remove_test_objects(store: Datastore) -> None:
    """Delete every object of Tulle's kinds and every lease a test made, so that the next test
    starts from an empty cluster (tests share one API server as they share one etcd). No
    namespace controller runs here: a deleted namespace is finalized by hand, which is what that
    controller does once the namespace is empty."""
    assert isinstance(store, KubernetesDatastore)
    for kind in KINDS:
        if kind == NAMESPACE:
            continue
        for obj in store.list(kind)[0]:
            store.delete(kind, obj["metadata"]["name"], obj["metadata"].get("namespace"))
    for lease in (store.call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases") or {}).get(
        "items", []
    ):
        name = lease["metadata"]["name"]
        store.call(
            "DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{name}", missing_ok=True
        )
    for namespace in store.list(NAMESPACE)[0]:
        name = namespace["metadata"]["name"]
        if name in SYSTEM_NAMESPACES:
            continue
        store.delete(NAMESPACE, name)
        finalized = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "spec": {"finalizers": []}}
        store.call("PUT", f"/api/v1/namespaces/{name}/finalize", finalized, missing_ok=True)
