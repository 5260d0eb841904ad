"""A datastore client's TLS: the context its connections are made with, made from files and made
again whenever a file changes, and every problem with those files said in one line that names
the file and the reason.

Rotation is replacing the files: each new connection first looks at them (a stat each), and a
changed set is loaded and checked before it is used. Checked here, before etcd sees them, so
that the user reads "expired on ..." rather than a TLS alert: the key matches the certificate,
the certificate is signed by the CA bundle, is meant for client authentication and is within
its validity period. The check is the one the server makes: a TLS handshake, in memory, between
a server that trusts the CA bundle and a client that presents the certificate.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from tulle.datastore.base import CredentialsError, TlsFiles

log = logging.getLogger(__name__)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (1.1.0 and later; the ssl module has no name for it): the
# check handshake leaves the dates to us, so that an expired certificate is reported with its date.
_NO_CHECK_TIME = 0x200000
# A certificate that expires sooner than this is warned about when it is loaded.
EXPIRY_WARNING_S = 7 * 24 * 3600

_Stamp = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class LoadedCertificate:
    context: ssl.SSLContext
    not_before: float
    not_after: float
    subject: str


def _describe(exc: OSError) -> str:
    """An OS error's reason without its errno and path (the message names the path itself)."""
    return exc.strerror or str(exc)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CredentialsError(f"{what} {path}: cannot be read ({_describe(exc)})") from None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _handshake_in_memory(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Run a TLS handshake between two contexts through memory buffers; the server's end."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(to_server, to_client, server_side=True)
    client_end = client.wrap_bio(to_client, to_server)
    done = {"server": False, "client": False}
    for _ in range(8):  # TLS 1.3 needs three flights; more means something is wrong
        for name, end in (("client", client_end), ("server", server_end)):
            if done[name]:
                continue
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        if all(done.values()):
            return server_end
    raise ssl.SSLError("the check handshake did not finish")


def load_client_certificate(files: TlsFiles) -> LoadedCertificate:
    """The client context for `files`, after checking them as the server will; CredentialsError
    names the file at fault and why.

    >>> load_client_certificate(TlsFiles("/no/ca", "c.crt", "c.key"))
    Traceback (most recent call last):
    ...
    tulle.datastore.base.CredentialsError: datastore CA bundle /no/ca: cannot be read (No such file or directory)
    """
    ca_pem = _read(files.ca, "datastore CA bundle")
    cert_pem = _read(files.cert, "datastore client certificate")
    _read(files.key, "datastore client key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem.decode(errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialsError(f"datastore CA bundle {files.ca}: not a PEM certificate ({_reason(exc)})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem.decode(errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialsError(
            f"datastore client certificate {files.cert}: not a PEM certificate ({_reason(exc)})"
        ) from None
    try:
        # A password callback that fails: an encrypted key must not stop the agent at a prompt.
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except (ssl.SSLError, OSError, _EncryptedKey) as exc:
        raise CredentialsError(f"datastore client key {files.key}: {_key_problem(exc, files.cert)}") from None
    checker = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    checker.load_cert_chain(files.cert, files.key, password=_no_password)
    checker.load_verify_locations(cadata=ca_pem.decode(errors="replace"))
    checker.verify_mode = ssl.CERT_REQUIRED
    checker.verify_flags |= _NO_CHECK_TIME
    presenter = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    presenter.check_hostname = False
    presenter.verify_mode = ssl.CERT_NONE  # only the client's certificate is under test
    presenter.load_cert_chain(files.cert, files.key, password=_no_password)
    try:
        seen = _handshake_in_memory(checker, presenter).getpeercert()
    except ssl.SSLCertVerificationError as exc:
        raise CredentialsError(
            f"datastore client certificate {files.cert}: not accepted with the CA bundle {files.ca} "
            f"({exc.verify_message})"
        ) from None
    except ssl.SSLError as exc:
        raise CredentialsError(f"datastore client certificate {files.cert}: {_reason(exc)}") from None
    assert seen, "a verified peer has a certificate"
    loaded = LoadedCertificate(
        context=context,
        not_before=ssl.cert_time_to_seconds(str(seen["notBefore"])),
        not_after=ssl.cert_time_to_seconds(str(seen["notAfter"])),
        subject=_subject(seen),
    )
    check_validity(files, loaded)
    return loaded


def _subject(cert: dict[str, Any]) -> str:
    """'O=tulle, OU=agent:node1' from getpeercert()'s nested tuples."""
    return ", ".join(f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn)


def check_validity(files: TlsFiles, loaded: LoadedCertificate, now: float | None = None) -> None:
    """CredentialsError if the certificate is not valid at `now` (default: this moment)."""
    now = time.time() if now is None else now
    if now >= loaded.not_after:
        raise CredentialsError(f"datastore client certificate {files.cert}: expired on {_when(loaded.not_after)}")
    if now < loaded.not_before:
        raise CredentialsError(
            f"datastore client certificate {files.cert}: not valid before {_when(loaded.not_before)} "
            "(is this machine's clock right?)"
        )


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey()


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc)


def _key_problem(exc: Exception, cert: str) -> str:
    if isinstance(exc, _EncryptedKey):
        return "is encrypted; give an unencrypted key (mode 0600)"
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"does not match the certificate {cert}"
    if isinstance(exc, ssl.SSLError):
        return f"not a PEM private key ({_reason(exc)})"
    assert isinstance(exc, OSError)
    return f"cannot be read ({_describe(exc)})"


def _stamp(files: TlsFiles) -> _Stamp:
    """What identifies the files' contents without reading them; a replaced file changes it."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in (files.ca, files.cert, files.key):
        try:
            st = os.stat(path)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class ClientTls:
    """The TLS context a client's new connections use, following its files: loaded again when
    they change, and refused (CredentialsError) while they are bad or the certificate is out of
    its validity period. `generation` moves on with every new context, so that a pool can drop
    connections made with an older one."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.generation = 0
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._loaded: LoadedCertificate | None = None
        self._error: CredentialsError | None = None

    def context(self) -> ssl.SSLContext:
        """The context for a new connection; CredentialsError if the files cannot be used."""
        stamp = _stamp(self.files)
        with self._lock:
            if stamp != self._stamp:
                self._reload(stamp)
            if self._error is not None:
                raise self._error
            assert self._loaded is not None
            check_validity(self.files, self._loaded)
            return self._loaded.context

    def _reload(self, stamp: _Stamp) -> None:
        first = self._stamp is None
        self._stamp = stamp
        try:
            loaded = load_client_certificate(self.files)
        except CredentialsError as exc:
            self._error = exc
            if not first:
                log.warning("the datastore client's TLS files changed and cannot be used", extra={"error": str(exc)})
            return
        self._loaded, self._error = loaded, None
        self.generation += 1
        if not first:
            log.info(
                "loaded the datastore client's new certificate",
                extra={"cert": self.files.cert, "subject": loaded.subject, "expires": _when(loaded.not_after)},
            )
        if loaded.not_after - time.time() < EXPIRY_WARNING_S:
            log.warning(
                "the datastore client certificate expires soon",
                extra={"cert": self.files.cert, "expires": _when(loaded.not_after)},
            )
        _warn_if_readable_by_others(self.files.key)


def _warn_if_readable_by_others(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "the datastore client key can be read by others; make it mode 0600",
            extra={"key": path, "mode": oct(stat.S_IMODE(mode))},
        )


def describe_handshake_failure(exc: ssl.SSLError, endpoint: str, files: TlsFiles) -> str | None:
    """What a failed TLS connection to the datastore says about this client's files, or None if
    it says nothing about them (a network fault)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"datastore CA bundle {files.ca}: does not verify the server at {endpoint} ({exc.verify_message}); "
            "is it the CA that signed etcd's certificate, and the address one of its names?"
        )
    reason = str(exc.reason or "")
    question = "is it signed by a CA that etcd trusts (--trusted-ca-file), and not revoked?"
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
        return f"datastore client certificate {files.cert}: refused by {endpoint} (TLS alert: {alert}); {question}"
    if isinstance(exc, ssl.SSLEOFError):
        # In TLS 1.3 the client has finished its handshake when the server checks its
        # certificate; a refusing server's alert then often arrives as a bare end of stream.
        return (
            f"datastore client certificate {files.cert}: refused by {endpoint}, it seems (it closed the "
            f"TLS connection before answering; its log says 'rejected connection' if so); {question}"
        )
    if reason == "WRONG_VERSION_NUMBER":
        return f"the datastore at {endpoint} does not speak TLS: is it plain http://?"
    return None
