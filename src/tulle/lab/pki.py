"""The lab's small certificate authority, made at `lab up` with Debian's openssl: one EC P-256
key and certificate per holder, each made by a single `openssl req` call (keys of that kind are
quick to make, so a lab of 100 nodes spends well under a second on them).

What it makes, and for whom (docs/deployment.md does the same for real machines):
- the CA: its key stays in the lab's `pki/` directory, which no agent is told about;
- etcd's server certificate: its address on the underlay as the name, and no Common Name,
  because etcd 3.4's JSON gateway calls etcd with this certificate, and a gateway call without
  a token would run as the etcd user that the Common Name names;
- one client certificate per agent and one for the CLI, without a Common Name either (etcd
  refuses those on its gateway once RBAC is on: the user comes from a login instead).
Private keys and passwords are written mode 0600.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from tulle.datastore.base import TlsFiles

OPENSSL = "/usr/bin/openssl"
DAYS = 365
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
# A config of its own, so that Debian's /etc/ssl/openssl.cnf adds no extensions (its v3_ca
# would make every certificate a CA).
_CONFIG = "[req]\ndistinguished_name = dn\n[dn]\n"


class PkiError(Exception):
    pass


@dataclass(frozen=True)
class Authority:
    """A CA: the certificate to trust, and the key that signs (kept out of every node's reach)."""

    cert: str
    key: str

    @property
    def config(self) -> str:
        return os.path.join(os.path.dirname(self.key), "openssl.cnf")


def _openssl(args: list[str]) -> None:
    try:
        subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=True, timeout=30)
    except FileNotFoundError:
        raise PkiError(f"{OPENSSL} is missing: install Debian's openssl") from None
    except subprocess.CalledProcessError as exc:
        raise PkiError(f"openssl {args[0]} failed: {exc.stderr.strip()}") from None


def write_secret(path: str, data: str) -> None:
    """Write a file only its owner may read (created so, never readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.chmod(path, 0o600)


def new_password() -> str:
    return secrets.token_urlsafe(24)


def make_authority(directory: str, name: str) -> Authority:
    """A new CA in `directory` (mode 0700): ca.crt, and ca.key (0600)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = Authority(cert=os.path.join(directory, "ca.crt"), key=os.path.join(directory, "ca.key"))
    with open(ca.config, "w") as f:
        f.write(_CONFIG)
    _openssl(
        [
            "req", "-x509", "-config", ca.config, *_KEY, "-keyout", ca.key, "-out", ca.cert,
            "-subj", f"/O=tulle/CN={name}", "-days", str(DAYS),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip
    os.chmod(ca.key, 0o600)
    return ca


def issue(ca: Authority, cert: str, key: str, subject: str, *, server_ip: str | None = None, days: int = DAYS) -> None:
    """A new key and a certificate for it signed by `ca`: a client's, or, with `server_ip`, a
    server's for that address (which etcd also presents as a client, to itself, from its gateway)."""
    usage = "serverAuth,clientAuth" if server_ip else "clientAuth"
    extensions = [
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", f"extendedKeyUsage={usage}",
    ]  # fmt: skip
    if server_ip:
        extensions += ["-addext", f"subjectAltName=IP:{server_ip}"]
    os.makedirs(os.path.dirname(cert), exist_ok=True)
    os.makedirs(os.path.dirname(key), exist_ok=True)
    _openssl(
        [
            "req", "-x509", "-config", ca.config, *_KEY, "-keyout", key, "-out", cert,
            "-subj", subject, "-days", str(days), "-CA", ca.cert, "-CAkey", ca.key, *extensions,
        ]
    )  # fmt: skip
    os.chmod(key, 0o600)


def client_files(ca: Authority, directory: str, subject: str) -> TlsFiles:
    """A client's TLS files in `directory`: a copy of the CA certificate (public), its
    certificate and its key (0600); never the CA's key."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = TlsFiles(
        ca=os.path.join(directory, "ca.crt"),
        cert=os.path.join(directory, "client.crt"),
        key=os.path.join(directory, "client.key"),
    )
    shutil.copyfile(ca.cert, files.ca)
    issue(ca, files.cert, files.key, subject)
    return files
