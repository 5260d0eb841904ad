"""Start and stop a real etcd server (Debian's etcd-server) for the lab and the tests: over TLS,
trusting client certificates signed by one CA only, unless a caller asks for plain HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from tulle.datastore.base import DatastoreError, Login, TlsFiles
from tulle.datastore.factory import open_datastore
from tulle.model.kinds import NAMESPACE

ETCD = "/usr/bin/etcd"


@dataclass(frozen=True)
class ServerTls:
    """etcd's TLS: the CA whose client certificates it accepts (no others), its certificate and key."""

    client_ca: str
    cert: str
    key: str


@dataclass
class EtcdServer:
    pid: int
    url: str
    data_dir: str
    client_tls: TlsFiles | None = None  # the files its starter reaches it with (None: plain HTTP)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_etcd(
    data_dir: str,
    client_host: str,
    client_port: int,
    peer_port: int,
    log_path: str,
    netns: str | None = None,
    name: str = "tulle",
    *,
    server_tls: ServerTls | None = None,
    client_tls: TlsFiles | None = None,
    login: Login | None = None,
) -> EtcdServer:
    """Start etcd (inside netns when given) and wait until it answers to `client_tls` (and
    `login`, once RBAC is on); the caller owns the PID. Without `server_tls`, plain HTTP."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    host = f"[{client_host}]" if ":" in client_host else client_host
    url = f"{'https' if server_tls else 'http'}://{host}:{client_port}"
    cmd = [
        ETCD,
        "--name", name,
        "--data-dir", data_dir,
        "--listen-client-urls", url,
        "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"{name}=http://127.0.0.1:{peer_port}",
        "--log-level", "warn",
        "--logger", "zap",
        # keep revisions for watches that resume after an agent restart
        "--auto-compaction-mode", "revision",
        "--auto-compaction-retention", "100000",
        "--quota-backend-bytes", str(2 * 1024**3),
        "--unsafe-no-fsync",  # test bed only: fsync costs seconds on this VM's disk
    ]  # fmt: skip
    if server_tls is not None:
        cmd += [
            "--client-cert-auth",
            "--trusted-ca-file", server_tls.client_ca,
            "--cert-file", server_tls.cert,
            "--key-file", server_tls.key,
            # test bed only: each login costs a bcrypt of this cost, and a lab's agents log in together
            "--bcrypt-cost", "4",
        ]  # fmt: skip
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = EtcdServer(pid=proc.pid, url=url, data_dir=data_dir, client_tls=client_tls)

    def probe() -> None:
        store = open_datastore(url, timeout=1, tls=client_tls, login=login, insecure=server_tls is None)
        try:
            store.get(NAMESPACE, "default")
        except DatastoreError:
            if not store.reachability.reachable:
                raise
            # etcd answered, and refused (this login may read only another prefix): it is up.
        finally:
            store.close()

    deadline = time.monotonic() + 20
    probe_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with status {proc.returncode}; see {log_path}")
        try:
            if netns:
                # the probe must run where etcd listens
                from tulle.dataplane.netns import run_in_netns

                run_in_netns(f"/run/netns/{netns}", probe)
            else:
                probe()
            return server
        except Exception as exc:
            probe_error = str(exc)
            time.sleep(0.1)
    stop_pid(proc.pid)
    raise RuntimeError(f"etcd did not answer at {url} within 20 s: {probe_error}; see {log_path}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def runs_as(pid: int, expect: str) -> bool:
    """Is `pid` a live process whose command line names `expect` (a reused PID is not ours)?"""
    if pid <= 0 or not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return expect.encode() in f.read()
    except FileNotFoundError:
        return False


def stop_pid(pid: int, timeout: float = 10.0, expect: str | None = None) -> None:
    """Stop one process by PID: SIGTERM, then SIGKILL. `expect` guards against a reused PID."""
    if expect is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if expect.encode() not in f.read():
                    return
        except FileNotFoundError:
            return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return
            time.sleep(0.05)
