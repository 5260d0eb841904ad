"""The serving end of a probe: answer on a port, over TCP and UDP, with the address the request
came from, so that the probing side learns whether its traffic was translated on the way.

The wire format, one line each way:
- TCP: the server sends `<source address>\\n` as soon as it accepts, and closes;
- UDP: the client sends `<token>\\n`, the server answers `<token> <source address>\\n`.

(`tulle.lab.probe.ServerSet` accepts and echoes but does not say who asked, which is what the
masquerade check needs to know.)

    >>> udp_reply(b"3f2a\\n", "10.244.0.7")
    b'3f2a 10.244.0.7\\n'
    >>> parse_udp_reply(b"3f2a 10.244.0.7\\n", "3f2a")
    '10.244.0.7'
"""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
import threading
from collections.abc import Iterable

_DATAGRAM_MAX = 512


def udp_reply(request: bytes, source: str) -> bytes | None:
    """The answer to a UDP request from `source`; None for a datagram that is no request."""
    words = request.split()
    if len(words) != 1 or len(words[0]) > 64:
        return None
    return words[0] + b" " + source.encode() + b"\n"


def parse_udp_reply(reply: bytes, token: str) -> str | None:
    """The source address the server saw, if `reply` answers the request carrying `token`."""
    words = reply.decode(errors="replace").split()
    if len(words) != 2 or words[0] != token:
        return None
    return parse_address(words[1])


def parse_address(text: str) -> str | None:
    """The address in a server's answer, or None if it is none.

    >>> parse_address("fd00:10:244::5\\n"), parse_address("<html>")
    ('fd00:10:244::5', None)
    """
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def open_listeners(port: int, families: Iterable[int], tries: int = 20) -> list[socket.socket]:
    """TCP and UDP sockets on `port` for each family, non-blocking; run it inside the namespace
    they are to serve in (a socket belongs to the namespace it was made in). Port 0: a free port
    per family, the same for TCP and UDP. All or none: a socket that cannot be made closes the others."""
    opened: list[socket.socket] = []
    try:
        for family in families:
            for attempt in range(tries):
                tcp = _listener(family, socket.SOCK_STREAM, port)
                try:
                    udp = _listener(family, socket.SOCK_DGRAM, int(tcp.getsockname()[1]))
                except OSError as exc:
                    tcp.close()
                    # A free TCP port whose UDP twin is taken: take another (only when any will do).
                    if port == 0 and exc.errno == errno.EADDRINUSE and attempt < tries - 1:
                        continue
                    raise
                opened += [tcp, udp]
                break
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


def _listener(family: int, kind: int, port: int) -> socket.socket:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    sock = socket.socket(af, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            # Apart from the IPv4 socket: a v4 client would otherwise show as ::ffff:a.b.c.d.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == 6 else "0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bound_port(sockets: Iterable[socket.socket], family: int, kind: int = socket.SOCK_STREAM) -> int:
    """The port the listener of this family and kind is bound to (for listeners opened on port 0)."""
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    for sock in sockets:
        if sock.family == af and sock.type == kind:
            return int(sock.getsockname()[1])
    raise LookupError(f"no IPv{family} listener")


class EchoServer:
    """Serves the given listeners from one thread until stop(); stop() closes them all.

    >>> server = EchoServer(open_listeners(0, [4]))  # doctest: +SKIP
    >>> server.start(); server.stop()  # doctest: +SKIP
    """

    def __init__(self, listeners: list[socket.socket]) -> None:
        self._listeners = listeners
        self._selector = selectors.DefaultSelector()
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="echo server", daemon=True)

    def start(self) -> None:
        self._selector.register(self._wake[0], selectors.EVENT_READ, None)
        for sock in self._listeners:
            handler = self._answer_tcp if sock.type == socket.SOCK_STREAM else self._answer_udp
            self._selector.register(sock, selectors.EVENT_READ, handler)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake[1].send(b"x")
            self._thread.join()
        self._selector.close()
        for sock in (*self._listeners, *self._wake):
            sock.close()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return
                key.data(key.fileobj)

    @staticmethod
    def _answer_tcp(listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                continue  # the client gave up before we got to it
            with conn:
                try:
                    # A few bytes into a fresh connection's empty send buffer: never blocks.
                    conn.send(f"{peer[0]}\n".encode())
                except OSError:
                    pass  # the client sees no answer, which is the verdict it should see

    @staticmethod
    def _answer_udp(sock: socket.socket) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(_DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to answer
            reply = udp_reply(data, peer[0])
            if reply is not None:
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    pass
