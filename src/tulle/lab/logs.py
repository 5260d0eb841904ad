"""A lab's logs, printed whole or followed as `tail -F` does.

They live in the lab's folder ($TULLE_LABS_DIR/NAME, by default /run/tulle/labs/NAME) and go with
it at `lab down`: `nodes/NODE/agent.log` for each node's agent (one JSON object a line;
`tulle lab logs`), `etcd.log` for the lab's etcd, `pods/NAMESPACE.POD.serve.log` for a pod's
`--serve` server.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import BinaryIO

CHUNK = 64 * 1024


def print_log(path: str, out: BinaryIO) -> None:
    """Write the log as it is now to `out`."""
    with open(path, "rb") as log:
        shutil.copyfileobj(log, out, CHUNK)
    out.flush()


def follow_log(path: str, out: BinaryIO, interval: float = 0.2) -> None:
    """Write the log to `out`, then whatever is written to it next, until its file is removed
    (its node or its lab went away). A file cut short or replaced is read again from its start.

    >>> follow_log("/run/tulle/labs/demo/nodes/node1/agent.log", sys.stdout.buffer)  # doctest: +SKIP
    """
    while True:
        try:
            with open(path, "rb") as log:
                if not _follow_file(path, log, out, interval):
                    return
        except FileNotFoundError:
            return  # removed before it could be opened again


def _follow_file(path: str, log: BinaryIO, out: BinaryIO, interval: float) -> bool:
    """Follow one open file: True once `path` names another file or a shorter one (read it
    again), False once it is removed."""
    inode = os.fstat(log.fileno()).st_ino
    while True:
        chunk = log.read(CHUNK)
        if chunk:
            out.write(chunk)
            out.flush()
            continue
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        if now.st_ino != inode or now.st_size < log.tell():
            return True
        time.sleep(interval)
