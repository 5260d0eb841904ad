"""The lab's datastore is authenticated (docs/design/datastore.md, invariant 8; docs/deployment.md):
etcd listens on the underlay over TLS and answers only clients with a certificate of the lab's
CA; each agent has its own certificate, key (0600) and etcd user, and can write only what
agents write; the CA key stays out of every node's reach; an agent takes up a replaced
certificate without a restart, and a bad one is a readiness problem naming the file, while
pods' traffic goes on (it never depended on the agent)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import DatastoreError, TlsFiles
from tulle.datastore.factory import open_datastore
from tulle.lab import pki
from tulle.lab import state as lab_state
from tulle.lab.cluster import Lab
from tulle.model.kinds import NETWORK_POLICY, NODE

from ..certlib import expired
from ..lablib import pod_ips, pod_netns, running_lab, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TULLE = os.path.join(REPO, ".venv", "bin", "tulle")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # A short lease: the agents call etcd every second (their heartbeat), so a replaced
    # certificate is taken up within a second or two.
    with running_lab("tl", nodes=2, mode="vxlan", lease_ttl=3) as lab:
        lab.add_pod("node1", "tls", "a", {}, [])
        lab.add_pod("node2", "tls", "b", {}, [])
        yield lab


def _ask_for_every_key(url: str, context: ssl.SSLContext | None) -> str:
    """What a client gets for a range over every key: 'keys: N' or why it got none."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=3)
    else:
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=3, context=context)
    try:
        conn.request("POST", "/v3/kv/range", body=json.dumps({"key": "AA==", "range_end": "AA=="}))
        response = conn.getresponse()
        body = response.read()
        if response.status == 200:
            return f"keys: {len(json.loads(body).get('kvs', []))}"
        return f"HTTP {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def test_etcd_gives_no_key_to_a_client_without_a_certificate(lab: Lab) -> None:
    url = state(lab)["etcd"]["url"]
    assert url.startswith("https://")
    ca = lab_state.lab_datastore(state(lab)).tls.ca
    plain_url = url.replace("https://", "http://")

    def probe() -> dict[str, str]:
        return {
            "plain HTTP": _ask_for_every_key(plain_url, None),
            "TLS without a certificate": _ask_for_every_key(url, ssl.create_default_context(cafile=ca)),
        }

    # From the external host, which reaches the underlay through the lab's router: TLS refuses.
    outside = run_in_netns(f"/run/netns/{lab.names.external}", probe)
    assert not outside["plain HTTP"].startswith("keys"), outside
    assert outside["TLS without a certificate"].startswith(("SSLError", "SSLEOFError")), outside
    # From a pod, which may reach the underlay by address: no key either (TLS refuses it, if
    # nothing on the way drops the connection first).
    inside = run_in_netns(pod_netns(lab, "tls/a"), probe)
    assert not any(answer.startswith(("keys", "HTTP")) for answer in inside.values()), inside


def test_each_agent_has_its_own_files_and_none_holds_or_names_the_ca_key(lab: Lab) -> None:
    pki_dir = lab_state.pki_dir(lab.name)
    assert os.stat(pki_dir).st_mode & 0o777 == 0o700
    with open(os.path.join(pki_dir, "ca.key")) as f:
        ca_key = f.read()
    subjects = set()
    for node, record in state(lab)["nodes"].items():
        tls, login = lab.agent_credentials(node)
        with open(f"/proc/{record['pid']}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert tls.cert in argv and tls.key in argv and login.password_file in argv
        assert not any(pki_dir in arg or "ca.key" in arg for arg in argv), argv
        for path in (tls.key, login.password_file):
            assert os.stat(path).st_mode & 0o777 == 0o600, path
        for folder, _, names in os.walk(lab.node_dir(node)):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, errors="replace") as f:
                        assert ca_key not in f.read(), path
        subject = subprocess.run(
            [pki.OPENSSL, "x509", "-in", tls.cert, "-noout", "-subject"], capture_output=True, text=True, check=True
        ).stdout
        assert "CN" not in subject  # etcd's gateway refuses a Common Name once RBAC is on
        subjects.add(subject)
    assert len(subjects) == len(state(lab)["nodes"])


def test_an_agents_credentials_cannot_write_a_network_policy_or_another_nodes_registration(lab: Lab) -> None:
    tls, login = lab.agent_credentials("node1")
    url = state(lab)["etcd"]["url"]

    def as_node1() -> dict[str, str]:
        store = open_datastore(url, tls=tls, login=login, timeout=3)
        outcome = {}
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "allow-all", "namespace": "tls"},
            "spec": {"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingress"]},
        }
        for what, write in (
            ("policy", lambda: store.create(policy)),
            ("node2", lambda: store.update(dict(store.get(NODE, "node2") or {}))),
            ("node1", lambda: store.update(dict(store.get(NODE, "node1") or {}))),
        ):
            try:
                write()
                outcome[what] = "written"
            except DatastoreError as exc:
                outcome[what] = str(exc)
        store.close()
        return outcome

    outcome = run_in_netns(f"/run/netns/{lab.names.underlay}", as_node1)
    assert re.search(r"refused kv/txn to user 'tulle-agent\.node1': etcdserver: permission denied", outcome["policy"])
    assert "permission denied" in outcome["node2"]
    assert outcome["node1"] == "written"  # its own registration is its to write
    assert lab.with_store(state(lab), lambda store: store.get(NETWORK_POLICY, "allow-all", "tls")) is None


def _status(lab: Lab, node: str) -> dict[str, Any]:
    result: dict[str, Any] = lab.agent_call(node, {"command": "AGENT_STATUS"}, timeout=5)["result"]
    return result


class Pinger:
    """A ping from one pod to another, running all along: at the end, what got lost."""

    def __init__(self, netns: str, address: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", "ping", "-n", "-i", "0.2", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> tuple[int, int]:
        """(sent, received)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out
        return int(found.group(1)), int(found.group(2))


def test_an_agent_takes_up_a_replaced_certificate_and_reports_a_bad_one_without_dropping_traffic(lab: Lab) -> None:
    tls, _ = lab.agent_credentials("node1")
    log_path = os.path.join(lab.node_dir("node1"), "agent.log")
    pid = state(lab)["nodes"]["node1"]["pid"]
    pinger = Pinger(pod_netns(lab, "tls/a"), pod_ips(lab, "tls/b")[4])
    try:
        # A new key and certificate, as an operator replaces them: taken up with the next call.
        lab.renew_agent_certificate("node1")
        assert wait_until(lambda: _log_mentions(log_path, "loaded the datastore client's new certificate"), 15)
        lab.add_pod("node1", "tls", "after-rotation", {}, [])
        # An expired one: a readiness problem naming the file, not a crash.
        expired(_authority(lab), tls.cert, tls.key)
        problem = f"datastore client certificate {tls.cert}: expired on "
        assert wait_until(lambda: any(problem in p for p in _status(lab, "node1")["problems"]), 15)
        assert not _status(lab, "node1")["ready"]
        assert _process_alive(pid)
        # Fixed again: ready, and a pod ADD goes through.
        lab.renew_agent_certificate("node1")
        assert wait_until(lambda: bool(_status(lab, "node1")["ready"]), 15), _status(lab, "node1")
        lab.add_pod("node1", "tls", "after-renewal", {}, [])
        assert state(lab)["nodes"]["node1"]["pid"] == pid  # never restarted
    finally:
        sent, received = pinger.stop()
    assert sent >= 10 and received == sent, (sent, received)


def _authority(lab: Lab) -> pki.Authority:
    directory = lab_state.pki_dir(lab.name)
    return pki.Authority(cert=os.path.join(directory, "ca.crt"), key=os.path.join(directory, "ca.key"))


def _log_mentions(path: str, text: str) -> bool:
    with open(path) as f:
        return text in f.read()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_cli_reaches_the_lab_as_its_admin(lab: Lab) -> None:
    access = lab_state.lab_datastore(state(lab))
    assert access.login is not None and access.login.user == lab_state.ADMIN_USER
    assert isinstance(access.tls, TlsFiles) and access.tls.cert.startswith(lab_state.admin_dir(lab.name))
    done = subprocess.run([TULLE, "get", "nodes", "--lab", lab.name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "node1" in done.stdout and "node2" in done.stdout
