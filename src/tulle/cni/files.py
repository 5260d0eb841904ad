"""Writing a file so that a reader, or a crash, sees the old file or the new one, never part of
one. Standard library only: the CNI plugin writes its pending DELs with it."""

from __future__ import annotations

import os


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
