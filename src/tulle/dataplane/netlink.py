"""Netlink sockets for the reconcilers: pyroute2's IPRoute with a fast name lookup, and one
socket a controller's reconcilers share.

pyroute2's `link_lookup(ifname=...)` asks the kernel for the link (~0.4 ms here, more with
many links); libc's if_nametoindex answers from an ioctl in microseconds. Opening a socket
costs ~0.5 ms, so work done per event (one node's routes) reuses one.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pyroute2 import IPRoute as _PyrouteIPRoute


class IPRoute(_PyrouteIPRoute):  # type: ignore[misc]
    """pyroute2's IPRoute, looking names up with if_nametoindex (same answers: [] if absent)."""

    def link_lookup(self, *args: Any, **kwargs: Any) -> list[int]:
        if not args and set(kwargs) == {"ifname"}:
            try:
                return [socket.if_nametoindex(kwargs["ifname"])]
            except OSError:
                return []
        found: list[int] = super().link_lookup(*args, **kwargs)
        return found


class SharedNetlink:
    """A netlink factory that hands out one long-lived socket, one user at a time: use it as
    `with shared() as ipr:` wherever a reconciler takes a factory. A socket that failed is
    closed and replaced on the next use. The socket lives in the namespace of the thread that
    first used it (an agent stays in its node's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ipr: IPRoute | None = None

    def __call__(self) -> SharedNetlink:
        return self

    def __enter__(self) -> IPRoute:
        self._lock.acquire()
        if self._ipr is None:
            try:
                self._ipr = IPRoute()
            except BaseException:
                self._lock.release()
                raise
        return self._ipr

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if isinstance(exc, OSError) and self._ipr is not None:
                self._ipr.close()
                self._ipr = None
        finally:
            self._lock.release()
