"""Writing a file so that a reader, or a crash, sees the old file or the new one, never part of
one; and the directories such files live in, root's alone. Standard library only: the CNI plugin
writes its pending DELs with it."""

from __future__ import annotations

import os
import stat


class UnsafePermissions(RuntimeError):
    """A directory that must be root's alone is not: the agent does not start on it."""


def make_private_dir(path: str) -> None:
    """Create `path` (and any missing parent) if it is missing; a directory this creates is 0700
    from the start, never wider for a moment. An existing one is left as it is (see
    `check_private_dir`).

    >>> import tempfile; folder = tempfile.mkdtemp()
    >>> make_private_dir(f"{folder}/state/pending-del")
    >>> [oct(os.stat(p).st_mode & 0o777) for p in (f"{folder}/state", f"{folder}/state/pending-del")]
    ['0o700', '0o700']
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not os.path.isdir(folder):  # a file in the way; a directory made meanwhile is fine
                raise


def check_private_dir(path: str, what: str, allow: int = 0) -> None:
    """Raise UnsafePermissions unless `path` is a directory of this user (root) that no one else
    may use: no permission bit for group or others but those in `allow`.

    >>> import tempfile; folder = tempfile.mkdtemp(); os.chmod(folder, 0o755)
    >>> check_private_dir(folder, "the state directory")
    Traceback (most recent call last):
    ...
    tulle.cni.files.UnsafePermissions: the state directory ... is mode 0755, wider than 0700: ...
    """
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePermissions(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePermissions(f"{what} {path} is owned by uid {st.st_uid}, not by uid {os.geteuid()} (root)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 & ~allow:
        widest = 0o700 | allow
        raise UnsafePermissions(
            f"{what} {path} is mode {mode:04o}, wider than {widest:04o}: "
            f"others could read or replace what is in it (chmod {widest:04o} {path})"
        )


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` through a temporary file in the same directory, created with
    `mode` from the start (never wider for a moment), flushed to disk, then renamed over.

    >>> import tempfile; folder = tempfile.mkdtemp()
    >>> write_atomically(f"{folder}/state.json", b"{}")
    >>> oct(os.stat(f"{folder}/state.json").st_mode & 0o777), open(f"{folder}/state.json").read()
    ('0o600', '{}')
    """
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A half-written file (a full disk, ...) would otherwise stay behind for good.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
