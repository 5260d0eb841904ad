"""The datastore's authentication (docs/design/datastore.md, invariant 8; docs/deployment.md):
etcd over TLS with client certificates, every bad credential said in one line that names the
file and the reason, certificates taken up when their files are replaced, plain HTTP refused
unless asked for, and etcd's RBAC through its JSON gateway (users that log in, since the
gateway cannot take a user from a certificate)."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests import certlib
from tulle.cli.main import main
from tulle.datastore.base import (
    AccessControl,
    CredentialsError,
    Datastore,
    DatastoreError,
    Login,
    TlsFiles,
)
from tulle.datastore.factory import open_datastore
from tulle.lab import pki
from tulle.lab.etcd_server import EtcdServer, ServerTls, free_port, start_etcd, stop_pid
from tulle.model.kinds import IPAM_BLOCK, NAMESPACE, NETWORK_POLICY, NODE, POD, WORKLOAD_ENDPOINT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TULLE = os.path.join(REPO, ".venv", "bin", "tulle")


def client(ca: pki.Authority, directory: str, subject: str = "/O=tulle/OU=test client") -> TlsFiles:
    return pki.client_files(ca, directory, subject)


def raw_range(url: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """One gateway call made by hand: a range over every key."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    else:
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=5, context=context)
    try:
        body = json.dumps({"key": "AA==", "range_end": "AA=="})
        conn.request("POST", "/v3/kv/range", body=body, headers={"Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- etcd refuses what has no certificate ----------------------------------------------------


def test_etcd_refuses_a_client_without_a_certificate(etcd_server: EtcdServer) -> None:
    assert etcd_server.url.startswith("https://")
    assert etcd_server.client_tls is not None
    no_certificate = ssl.create_default_context(cafile=etcd_server.client_tls.ca)
    with pytest.raises(ssl.SSLError):  # etcd ends the handshake; nothing is read
        raw_range(etcd_server.url, no_certificate)
    # Plain HTTP to the TLS port: etcd closes the connection, nothing is read.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        raw_range(etcd_server.url.replace("https://", "http://"), None)


def test_etcd_refuses_a_certificate_of_another_ca(etcd_server: EtcdServer, tmp_path: Any) -> None:
    other = pki.make_authority(str(tmp_path / "other-ca"), "another CA")
    files = client(other, str(tmp_path / "client"))
    assert etcd_server.client_tls is not None
    # The client's own check would stop it first; present the certificate by hand.
    context = ssl.create_default_context(cafile=etcd_server.client_tls.ca)
    context.load_cert_chain(files.cert, files.key)
    with pytest.raises(ssl.SSLError):  # an alert, or (TLS 1.3) the end of the stream
        raw_range(etcd_server.url, context)
    # Through the client, with a CA bundle that holds both CAs (so that its own check passes):
    # etcd's refusal is said in one line naming the certificate.
    bundle = str(tmp_path / "bundle.crt")
    with open(bundle, "w") as out:
        for path in (etcd_server.client_tls.ca, other.cert):
            with open(path) as f:
                out.write(f.read())
    store = open_datastore(etcd_server.url, tls=TlsFiles(bundle, files.cert, files.key), timeout=2)
    with pytest.raises(CredentialsError) as raised:
        store.get(NAMESPACE, "default")
    assert str(raised.value).startswith(f"datastore client certificate {files.cert}: refused by {etcd_server.url}")
    assert str(raised.value).endswith("is it signed by a CA that etcd trusts (--trusted-ca-file), and not revoked?")
    assert store.reachability.describe().endswith(str(raised.value))
    # With the other CA alone, etcd's own certificate is not trusted: the CA bundle is named.
    strangers = open_datastore(etcd_server.url, tls=TlsFiles(other.cert, files.cert, files.key), timeout=2)
    with pytest.raises(CredentialsError, match=rf"^datastore CA bundle {other.cert}: does not verify the server at"):
        strangers.get(NAMESPACE, "default")


def test_plain_http_is_refused_unless_the_caller_accepts_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CA", "CERT", "KEY"):  # the session's etcd is TLS: its files may be in the environment
        monkeypatch.delenv(f"TULLE_DATASTORE_{name}", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DatastoreError, match=r"refusing plain-HTTP etcd .* --insecure-datastore"):
        open_datastore(url)
    assert open_datastore(url, insecure=True).url == url
    with pytest.raises(SystemExit) as exited:
        main(["get", "ns", "--datastore", url])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing plain-HTTP etcd") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["get", "ns", "--datastore", url, "--insecure-datastore"])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"warning: the datastore {url} is plain HTTP without authentication")
    assert lines[1].startswith(f"error: etcd at {url} is unreachable")


def test_the_agent_warns_at_start_when_it_runs_on_plain_http(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    from tulle.agent.main import Agent, AgentConfig

    url = f"http://127.0.0.1:{free_port()}"
    config = AgentConfig(
        node="n1",
        datastore=url,
        insecure_datastore=True,
        state_dir=str(tmp_path / "state"),
        socket=str(tmp_path / "run" / "agent.sock"),
    )
    with caplog.at_level(logging.WARNING, logger="tulle.agent"):
        agent = Agent(config)  # built, never started: nothing touches this namespace
    agent.datastore.close()
    assert any("plain HTTP without authentication" in r.getMessage() for r in caplog.records)


# -- one line that names the file and the reason ---------------------------------------------


@dataclass
class Case:
    name: str
    spoil: Any  # (ca, files, tmp) -> TlsFiles to use
    says: str  # a regular expression for the whole message


def _missing_cert(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    return TlsFiles(f.ca, str(tmp / "nowhere.crt"), f.key)


def _unreadable_key(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    os.makedirs(tmp / "a-directory.key")
    return TlsFiles(f.ca, f.cert, str(tmp / "a-directory.key"))


def _garbage_cert(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    (tmp / "garbage.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    )
    return TlsFiles(f.ca, str(tmp / "garbage.crt"), f.key)


def _garbage_ca(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    (tmp / "garbage-ca.crt").write_text("hello\n")
    return TlsFiles(str(tmp / "garbage-ca.crt"), f.cert, f.key)


def _garbage_key(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    (tmp / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    return TlsFiles(f.ca, f.cert, str(tmp / "garbage.key"))


def _other_key(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    other = client(ca, str(tmp / "other"))
    return TlsFiles(f.ca, f.cert, other.key)


def _other_ca(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    stranger = client(pki.make_authority(str(tmp / "stranger-ca"), "stranger"), str(tmp / "stranger"))
    return TlsFiles(f.ca, stranger.cert, stranger.key)


def _server_only(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    pki.issue(ca, str(tmp / "server.crt"), str(tmp / "server.key"), "/O=tulle", server_ip="127.0.0.1")
    # A certificate for servers and clients is a client's too; one for servers only is not.
    (tmp / "serveronly.crt").write_text("")
    subprocess.run(
        [
            pki.OPENSSL, "req", "-x509", "-config", ca.config, "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp / "serveronly.key"),
            "-out", str(tmp / "serveronly.crt"), "-subj", "/O=tulle", "-days", "3", "-CA", ca.cert,
            "-CAkey", ca.key, "-addext", "extendedKeyUsage=serverAuth",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return TlsFiles(f.ca, str(tmp / "serveronly.crt"), str(tmp / "serveronly.key"))


def _expired(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    certlib.expired(ca, str(tmp / "expired.crt"), str(tmp / "expired.key"))
    return TlsFiles(f.ca, str(tmp / "expired.crt"), str(tmp / "expired.key"))


def _not_yet_valid(ca: pki.Authority, f: TlsFiles, tmp: Any) -> TlsFiles:
    certlib.not_yet_valid(ca, str(tmp / "early.crt"), str(tmp / "early.key"))
    return TlsFiles(f.ca, str(tmp / "early.crt"), str(tmp / "early.key"))


NOT_ACCEPTED = r"datastore client certificate {cert}: not accepted with the CA bundle {ca} "
CASES = [
    Case(
        "missing", _missing_cert, r"datastore client certificate {cert}: cannot be read \(No such file or directory\)"
    ),
    Case("unreadable", _unreadable_key, r"datastore client key {key}: cannot be read \(Is a directory\)"),
    Case("malformed certificate", _garbage_cert, r"datastore client certificate {cert}: not a PEM certificate \(.+\)"),
    Case("malformed CA", _garbage_ca, r"datastore CA bundle {ca}: not a PEM certificate \(.+\)"),
    Case("malformed key", _garbage_key, r"datastore client key {key}: not a PEM private key \(.+\)"),
    Case(
        "key of another certificate", _other_key, r"datastore client key {key}: does not match the certificate {cert}"
    ),
    Case(
        "signed by another CA",
        _other_ca,
        NOT_ACCEPTED + r"\(unable to get local issuer certificate\)",
    ),
    Case(
        "not for clients",
        _server_only,
        NOT_ACCEPTED + r"\(unsuitable certificate purpose\)",
    ),
    Case("expired", _expired, r"datastore client certificate {cert}: expired on \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC"),
    Case("not yet valid", _not_yet_valid, r"datastore client certificate {cert}: not valid before .+ clock right\?\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_credential_is_one_line_naming_the_file_and_the_reason(
    case: Case, session_ca: pki.Authority, etcd_server: EtcdServer, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    good = client(session_ca, str(tmp_path / "good"))
    bad = case.spoil(session_ca, good, tmp_path)
    expected = case.says.format(
        ca=bad.ca.replace(".", r"\."), cert=bad.cert.replace(".", r"\."), key=bad.key.replace(".", r"\.")
    )
    with pytest.raises(CredentialsError) as raised:
        open_datastore(etcd_server.url, tls=bad)
    assert "\n" not in str(raised.value)
    assert _fullmatch(expected, str(raised.value))
    # The CLI says the same, as `error: ...` and nothing else.
    with pytest.raises(SystemExit):
        main(["get", "ns", "--datastore", etcd_server.url, "--datastore-cert", bad.cert, "--datastore-key", bad.key,
              "--datastore-ca", bad.ca])  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and _fullmatch(f"error: {expected}\n", err)


def _fullmatch(pattern: str, text: str) -> bool:
    import re

    return re.fullmatch(pattern, text, re.DOTALL) is not None


@pytest.mark.root
def test_the_agent_exits_with_one_line_naming_a_bad_file(
    session_ca: pki.Authority, etcd_server: EtcdServer, tmp_path: Any
) -> None:
    files = client(session_ca, str(tmp_path / "agent"))
    certlib.expired(session_ca, files.cert, files.key)
    argv = [
        TULLE, "agent", "--node", "n1", "--datastore", etcd_server.url, "--datastore-ca", files.ca,
        "--datastore-cert", files.cert, "--datastore-key", files.key,
        "--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "run" / "agent.sock"),
    ]  # fmt: skip
    # In a network namespace of its own: were the check to let it through, it would start.
    done = subprocess.run(["unshare", "--net", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = json.loads(lines[0])
    assert line["msg"] == "cannot start"
    assert line["error"].startswith(f"datastore client certificate {files.cert}: expired on ")
    plain = [TULLE, "agent", "--node", "n1", "--datastore", etcd_server.url.replace("https", "http"), *argv[6:]]
    done = subprocess.run(["unshare", "--net", *plain], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "refusing plain-HTTP etcd" in json.loads(done.stderr)["error"]


# -- rotation: replacing the files is enough --------------------------------------------------


class _SubjectEcho(BaseHTTPRequestHandler):
    """Answers every range with the Organizational Unit of the client certificate it was shown."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        unit = dict(x[0] for x in cert["subject"]).get("organizationalUnitName", "")
        kv = {"key": base64.b64encode(b"k").decode(), "value": base64.b64encode(unit.encode()).decode()}
        body = json.dumps({"header": {"revision": "1"}, "kvs": [{**kv, "mod_revision": "1"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def subject_echo(session_ca: pki.Authority, tmp_path: Any) -> Iterator[str]:
    """An HTTPS server that requires a client certificate of the session's CA and says whose it saw."""
    cert, key = str(tmp_path / "echo.crt"), str(tmp_path / "echo.key")
    pki.issue(session_ca, cert, key, "/O=tulle/OU=echo", server_ip="127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(session_ca.cert)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SubjectEcho)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_replaced_files_are_presented_on_the_next_call_and_bad_ones_are_reported_until_fixed(
    session_ca: pki.Authority, subject_echo: str, tmp_path: Any
) -> None:
    from tulle.datastore.etcd_client import EtcdClient  # the client itself: a backend test

    files = client(session_ca, str(tmp_path / "me"), "/O=tulle/OU=first")
    etcd = EtcdClient(subject_echo, tls=files)
    assert etcd.get("k").value == b"first"  # type: ignore[union-attr]
    assert etcd.get("k").value == b"first"  # type: ignore[union-attr]  # a pooled connection
    pki.issue(session_ca, f"{files.cert}.new", f"{files.key}.new", "/O=tulle/OU=second")
    os.replace(f"{files.key}.new", files.key)
    os.replace(f"{files.cert}.new", files.cert)
    assert etcd.get("k").value == b"second"  # type: ignore[union-attr]  # not the pooled connection of before
    certlib.expired(session_ca, files.cert, files.key)
    with pytest.raises(CredentialsError, match=f"^datastore client certificate {files.cert}: expired on "):
        etcd.get("k")
    assert etcd.reachability.describe().endswith(
        f"datastore client certificate {files.cert}: " + "expired on " + _date_of(etcd)
    )
    pki.issue(session_ca, f"{files.cert}.new", f"{files.key}.new", "/O=tulle/OU=third")
    os.replace(f"{files.key}.new", files.key)
    os.replace(f"{files.cert}.new", files.cert)
    assert etcd.get("k").value == b"third"  # type: ignore[union-attr]
    assert etcd.reachability.reachable
    etcd.close()


def _date_of(etcd: Any) -> str:
    return str(etcd.reachability.error).rsplit("expired on ", 1)[1]


def test_a_rotated_certificate_keeps_a_client_of_the_real_etcd_working(
    session_ca: pki.Authority, etcd_server: EtcdServer, tmp_path: Any, prefix: str
) -> None:
    files = client(session_ca, str(tmp_path / "me"))
    store = open_datastore(etcd_server.url, prefix, tls=files)
    _, version = store.list(NAMESPACE)
    watch = store.watch(NAMESPACE, version)
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "before"}})
    pki.issue(session_ca, f"{files.cert}.new", f"{files.key}.new", "/O=tulle/OU=rotated")
    os.replace(f"{files.key}.new", files.key)
    os.replace(f"{files.cert}.new", files.cert)
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "after"}})
    seen = [watch.get(5), watch.get(5)]  # the watch made before the rotation goes on
    assert [e.object["metadata"]["name"] for e in seen if e] == ["before", "after"]
    watch.cancel()
    store.close()


# -- etcd's RBAC through the gateway ----------------------------------------------------------

RBAC_PREFIX = "/rbac"


@dataclass
class RbacEtcd:
    server: EtcdServer
    ca: pki.Authority
    work: str
    admin: tuple[TlsFiles, Login]

    def login(self, name: str, user: str, password: str) -> tuple[TlsFiles, Login]:
        directory = os.path.join(self.work, name)
        files = client(self.ca, directory, f"/O=tulle/OU={name}")
        password_file = os.path.join(directory, "password")
        pki.write_secret(password_file, password)
        return files, Login(user, password_file)

    def open(self, who: tuple[TlsFiles, Login | None]) -> Datastore:
        return open_datastore(self.server.url, RBAC_PREFIX, tls=who[0], login=who[1], timeout=3)

    def access(self) -> AccessControl:
        root = self.open((self.admin[0], Login("root", os.path.join(self.work, "root.password"))))
        assert isinstance(root, AccessControl)
        return root


def _start_rbac_etcd(ca: pki.Authority, work: str, common_name: str | None = None) -> tuple[EtcdServer, ServerTls]:
    subject = f"/O=tulle/CN={common_name}" if common_name else "/O=tulle/OU=etcd"
    return certlib.start_tls_etcd(ca, work, subject, client(ca, os.path.join(work, "admin")))


@pytest.fixture(scope="module")
def rbac_etcd(session_ca: pki.Authority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RbacEtcd]:
    """An etcd of this module's own with RBAC on, as the lab turns it on."""
    work = str(tmp_path_factory.mktemp("rbac-etcd"))
    server, _ = _start_rbac_etcd(session_ca, work)
    assert server.client_tls is not None
    pki.write_secret(os.path.join(work, "root.password"), "root-secret")
    etcd = RbacEtcd(server, session_ca, work, (server.client_tls, Login("x", "x")))
    etcd.admin = etcd.login("admin", "tulle-admin", "admin-secret")
    setup = open_datastore(server.url, RBAC_PREFIX, tls=server.client_tls)
    assert isinstance(setup, AccessControl)
    setup.enable_access_control("root-secret", "tulle-admin", "admin-secret")
    try:
        yield etcd
    finally:
        stop_pid(etcd.server.pid)  # restarted by a test, perhaps
        shutil.rmtree(work, ignore_errors=True)


def _node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def _policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }


def test_an_agent_writes_what_agents_write_and_nothing_else(rbac_etcd: RbacEtcd) -> None:
    access = rbac_etcd.access()
    one = rbac_etcd.login("n1", access.add_agent_user("n1", "n1-secret"), "n1-secret")
    access.add_agent_user("n2", "n2-secret")
    admin = rbac_etcd.open(rbac_etcd.admin)
    admin.create(_node("n2"))
    agent = rbac_etcd.open(one)
    # What agents write: endpoints, blocks, their own Node and heartbeat (and its lease), and
    # they delete the Pods of a removed node.
    agent.create(
        {"apiVersion": "tulle.dev/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w", "namespace": "default"}}
    )
    agent.create({"apiVersion": "tulle.dev/v1", "kind": "IPAMBlock", "metadata": {"name": "b"}})
    agent.create(_node("n1"))
    beat = agent.heartbeat("n1", 10)
    beat.start()
    beat.start()  # a second agent's start revokes the first one's lease: allowed on its own key
    assert "n1" in agent.live_nodes()
    assert agent.get(WORKLOAD_ENDPOINT, "w", "default") is not None
    assert agent.list(IPAM_BLOCK)[0]
    admin.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "orphan", "namespace": "default"}})
    assert agent.delete(POD, "orphan", "default")
    # What they must not: the cluster's policy and namespaces, and another node's registration.
    for write in (
        lambda: agent.create(_policy("sneaky")),
        lambda: agent.delete(NAMESPACE, "default"),
        lambda: agent.update(_node("n2")),
        lambda: agent.heartbeat("n2", 10).start(),
    ):
        with pytest.raises(
            DatastoreError, match=r"refused .* to user 'tulle-agent\.n1': etcdserver: permission denied"
        ):
            write()
    assert agent.get(NETWORK_POLICY, "sneaky", "default") is None
    assert agent.reachability.reachable  # a refusal is an answer, not an outage
    admin.create(_policy("allowed"))  # the admin (the CLI) writes everything under the prefix
    access.remove_agent_user("n2")
    with pytest.raises(CredentialsError, match=r"refused it for user 'tulle-agent\.n2'"):
        rbac_etcd.open(rbac_etcd.login("n2", "tulle-agent.n2", "n2-secret")).get(NODE, "n2")


_REFUSED = "(etcdserver: authentication failed, invalid user ID or password)"


def test_without_a_user_or_with_a_common_name_the_client_is_told_what_to_do(
    rbac_etcd: RbacEtcd, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    anonymous = rbac_etcd.open((rbac_etcd.admin[0], None))
    with pytest.raises(CredentialsError, match="has RBAC on and this client gave no user: give --datastore-user"):
        anonymous.get(NAMESPACE, "default")
    cert, key = str(tmp_path / "cn.crt"), str(tmp_path / "cn.key")
    certlib.issue_dated(
        rbac_etcd.ca, cert, key, not_before=certlib.now(), not_after=certlib.now().replace(year=certlib.now().year + 1),
        common_name="tulle-admin",
    )  # fmt: skip
    named = rbac_etcd.open((TlsFiles(rbac_etcd.ca.cert, cert, key), rbac_etcd.admin[1]))
    with pytest.raises(CredentialsError, match=f"^datastore client certificate {cert}: has a Common Name"):
        named.get(NAMESPACE, "default")
    wrong = rbac_etcd.login("wrong", "tulle-admin", "not-the-password")
    refused = rbac_etcd.open(wrong)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tulle.datastore"):
        for _ in range(3):
            with pytest.raises(CredentialsError, match=f"^datastore password file {wrong[1].password_file}: etcd at"):
                refused.get(NAMESPACE, "default")
    # One outage, said once: an answer that refuses the credential does not end it.
    assert [r.getMessage() for r in caplog.records] == ["the datastore stopped answering"]
    assert refused.reachability.describe().endswith(f"refused it for user 'tulle-admin' {_REFUSED}")


def test_a_changed_password_is_read_from_its_file_and_etcd_restarting_costs_one_login(rbac_etcd: RbacEtcd) -> None:
    access = rbac_etcd.access()
    who = rbac_etcd.login("n3", access.add_agent_user("n3", "old-secret"), "old-secret")
    agent = rbac_etcd.open(who)
    assert agent.get(NODE, "n3") is None
    access.add_agent_user("n3", "new-secret")  # etcd forgets the tokens of a user whose password changes
    with pytest.raises(CredentialsError, match=f"datastore password file {who[1].password_file}: .* refused it"):
        agent.get(NODE, "n3")
    pki.write_secret(who[1].password_file, "new-secret\n")
    assert agent.get(NODE, "n3") is None
    # The password set again, as it was: etcd forgets the tokens, the file stays as it is. A
    # watch with the forgotten token is refused at once (where the informer backs off), and
    # the next one logs in again.
    _, version = agent.list(NODE)
    access.add_agent_user("n3", "new-secret")
    with pytest.raises(DatastoreError, match=r"refused the watch: .*invalid auth token"):
        agent.watch(NODE, version)
    agent.watch(NODE, version).cancel()
    # After etcd restarts, the client goes on (logging in again if etcd forgot its token).
    server = rbac_etcd.server
    stop_pid(server.pid)
    parts = urlsplit(server.url)
    work = rbac_etcd.work
    restarted = start_etcd(
        data_dir=server.data_dir,
        client_host="127.0.0.1",
        client_port=parts.port or 0,
        peer_port=free_port(),
        log_path=os.path.join(work, "etcd.log"),
        server_tls=ServerTls(rbac_etcd.ca.cert, os.path.join(work, "etcd.crt"), os.path.join(work, "etcd.key")),
        client_tls=rbac_etcd.admin[0],
        login=rbac_etcd.admin[1],
    )
    rbac_etcd.server = restarted
    _, version = rbac_etcd.open(rbac_etcd.admin).list(NODE)
    agent.watch(NODE, version).cancel()
    assert agent.get(NODE, "n3") is None


def test_etcd_runs_a_gateway_call_without_accept_as_its_server_certificates_common_name(
    session_ca: pki.Authority, tmp_path: Any
) -> None:
    """Why etcd's server certificate must carry no Common Name (docs/deployment.md): etcd 3.4's
    gateway calls etcd with that certificate, and etcd ignores its Common Name only for calls
    that carry the gateway's mark, which the gateway adds only when the request has an Accept
    header. Tulle's client sends one; another client, with any valid client certificate and no
    token, would act as the user the Common Name names."""
    server, _ = _start_rbac_etcd(session_ca, str(tmp_path), common_name="root")
    try:
        assert server.client_tls is not None
        setup = open_datastore(server.url, RBAC_PREFIX, tls=server.client_tls)
        assert isinstance(setup, AccessControl)
        setup.enable_access_control("root-secret", "tulle-admin", "admin-secret")
        context = ssl.create_default_context(cafile=server.client_tls.ca)
        context.load_cert_chain(server.client_tls.cert, server.client_tls.key)
        parts = urlsplit(server.url)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=5, context=context)
        body = json.dumps({"key": base64.b64encode(b"/rbac/x").decode(), "value": "eA=="})
        conn.request("POST", "/v3/kv/put", body=body)  # no Accept header, no token
        assert conn.getresponse().status == 200  # written, as root
        conn.close()
        with pytest.raises(CredentialsError, match="gave no user"):
            open_datastore(server.url, RBAC_PREFIX, tls=server.client_tls).get(NAMESPACE, "default")
    finally:
        stop_pid(server.pid)


def test_the_tls_check_costs_milliseconds(session_ca: pki.Authority, tmp_path: Any) -> None:
    import time

    from tulle.datastore.tls import load_client_certificate

    files = client(session_ca, str(tmp_path / "c"))
    started = time.perf_counter()
    for _ in range(10):
        load_client_certificate(files)
    assert (time.perf_counter() - started) / 10 < 0.05


def test_the_lab_pki_keeps_keys_private_and_certificates_without_a_common_name(tmp_path: Any) -> None:
    ca = pki.make_authority(str(tmp_path / "pki"), "lab")
    files = client(ca, str(tmp_path / "node1"), "/O=tulle/OU=agent node1")
    for key in (ca.key, files.key):
        assert os.stat(key).st_mode & 0o777 == 0o600
    assert os.stat(str(tmp_path / "pki")).st_mode & 0o777 == 0o700
    subject = subprocess.run(
        [pki.OPENSSL, "x509", "-in", files.cert, "-noout", "-subject"], capture_output=True, text=True, check=True
    ).stdout
    assert "CN" not in subject
    assert sorted(os.listdir(tmp_path / "node1")) == ["ca.crt", "client.crt", "client.key"]


def test_the_deployment_guide_grants_what_the_lab_grants() -> None:
    """docs/deployment.md's etcdctl lines and the roles the lab makes are one and the same."""
    import re

    from tulle.datastore.etcd import EtcdDatastore
    from tulle.datastore.etcd_client import EtcdClient

    with open(os.path.join(REPO, "docs", "deployment.md")) as f:
        guide = f.read()
    documented = {
        (role, access.upper(), key, bool(prefix))
        for role, access, key, prefix in re.findall(
            r"^etcdctl role grant-permission (\S+) (read|write|readwrite) (\S+)( --prefix=true)?$", guide, re.MULTILINE
        )
    }
    etcd = EtcdDatastore(EtcdClient("http://127.0.0.1:1"), "/tulle")  # never called: grants are plain data
    granted = {("tulle-admin", "READWRITE", "/tulle/", True)}
    granted |= {("tulle-agent", g.access, g.key, g.prefix) for g in etcd.agent_grants()}
    granted |= {(etcd.node_role("node1"), g.access, g.key, g.prefix) for g in etcd.node_grants("node1")}
    assert documented == granted
    assert f"etcdctl user add {etcd.agent_user('node1')}" in guide
