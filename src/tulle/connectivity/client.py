"""The probing end, run inside a probe pod: `python -m tulle.connectivity.client ADDRESS PORT tcp|udp`.

Prints the address the server saw the request come from and exits 0; on no answer (a drop, a
reset, an ICMP error, no route, a timeout) prints why on stderr and exits 1; on bad arguments
exits 2. Standard library only and nothing else imported: it starts once per probe.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Sequence

from tulle.connectivity.echo import parse_address, parse_udp_reply

EXIT_NO_ANSWER = 1


class NoAnswer(Exception):
    """The server was not reached, or did not answer as it should."""


def probe(address: str, port: int, protocol: str, timeout: float) -> str:
    """The source address the server at address:port saw; NoAnswer if there was no answer.

    >>> probe("127.0.0.1", 9, "udp", 0.3)  # doctest: +SKIP
    Traceback (most recent call last):
    NoAnswer: connection refused (ICMP port unreachable)
    """
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        if protocol == "tcp":
            return _probe_tcp(sock, (address, port), timeout)
        return _probe_udp(sock, (address, port), timeout)


def _probe_tcp(sock: socket.socket, target: tuple[str, int], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        sock.connect(target)
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 128:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(128)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        raise NoAnswer(f"timed out after {timeout:g} s") from None
    except OSError as exc:
        raise NoAnswer(_why(exc)) from None
    seen = parse_address(answer.decode(errors="replace"))
    if seen is None:
        raise NoAnswer(f"connected, but the answer was not an address: {answer[:40]!r}")
    return seen


def _probe_udp(sock: socket.socket, target: tuple[str, int], timeout: float) -> str:
    token = os.urandom(8).hex()
    deadline = time.monotonic() + timeout
    resend_every = timeout / 3  # one lost datagram must not read as no answer
    try:
        sock.connect(target)
        while (now := time.monotonic()) < deadline:
            sock.send(f"{token}\n".encode())
            wait_until = min(deadline, now + resend_every)
            while (left := wait_until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    seen = parse_udp_reply(sock.recv(512), token)
                except TimeoutError:
                    break
                if seen is not None:
                    return seen
    except OSError as exc:
        raise NoAnswer(_why(exc)) from None
    raise NoAnswer(f"timed out after {timeout:g} s")


def _why(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tulle.connectivity.client",
        description="Probe a tulle echo server; print the address it saw this request come from.",
    )
    parser.add_argument("address", help="the server's IPv4 or IPv6 address")
    parser.add_argument("port", type=int)
    parser.add_argument("protocol", choices=["tcp", "udp"])
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the answer (default: 1)")
    args = parser.parse_args(argv)
    if parse_address(args.address) is None:
        parser.error(f"address {args.address!r} is not an IPv4 or IPv6 address")
    try:
        print(probe(args.address, args.port, args.protocol, args.timeout))
    except NoAnswer as exc:
        print(exc, file=sys.stderr)
        return EXIT_NO_ANSWER
    return 0


if __name__ == "__main__":
    sys.exit(main())
