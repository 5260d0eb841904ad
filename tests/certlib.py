"""Certificates for tests: an etcd on loopback that takes only clients of a CA, and certificates
that the lab's CA (openssl 3.0's `req`) cannot make: ones whose validity period lies in the past
or the future, or that carry a Common Name, made with the `cryptography` package (Debian's
python3-cryptography, seen by the venv)."""

from __future__ import annotations

import datetime
import os

import pytest

from tulle.datastore.base import TlsFiles
from tulle.lab import pki
from tulle.lab.etcd_server import EtcdServer, ServerTls, free_port, start_etcd
from tulle.lab.pki import Authority


def start_tls_etcd(ca: Authority, work: str, subject: str, client_tls: TlsFiles) -> tuple[EtcdServer, ServerTls]:
    """A real etcd on loopback, its files in `work`, answering over TLS only clients of `ca`;
    its certificate has `subject`, and it calls itself (gateway to server) with `client_tls`."""
    tls = ServerTls(client_ca=ca.cert, cert=os.path.join(work, "etcd.crt"), key=os.path.join(work, "etcd.key"))
    pki.issue(ca, tls.cert, tls.key, subject, server_ip="127.0.0.1")
    server = start_etcd(
        data_dir=os.path.join(work, "data"),
        client_host="127.0.0.1",
        client_port=free_port(),
        peer_port=free_port(),
        log_path=os.path.join(work, "etcd.log"),
        server_tls=tls,
        client_tls=client_tls,
    )
    return server, tls


def issue_dated(
    ca: Authority,
    cert: str,
    key: str,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    common_name: str | None = None,
) -> None:
    """A client certificate and key signed by `ca`, valid from `not_before` to `not_after`,
    written as the lab writes them (the key mode 0600), replacing what is there at once."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    with open(ca.key, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(ca.cert, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    private = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tulle")]
    if common_name:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    built = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca_cert.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(f"{key}.new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(f"{cert}.new", "wb") as f:
        f.write(built.public_bytes(serialization.Encoding.PEM))
    os.replace(f"{key}.new", key)
    os.replace(f"{cert}.new", cert)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def expired(ca: Authority, cert: str, key: str) -> None:
    """A certificate that expired an hour ago."""
    issue_dated(
        ca, cert, key, not_before=now() - datetime.timedelta(days=2), not_after=now() - datetime.timedelta(hours=1)
    )


def not_yet_valid(ca: Authority, cert: str, key: str) -> None:
    """A certificate valid from tomorrow."""
    issue_dated(
        ca, cert, key, not_before=now() + datetime.timedelta(days=1), not_after=now() + datetime.timedelta(days=30)
    )
