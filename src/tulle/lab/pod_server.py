"""`tulle lab pod add --serve`: a pod's declared TCP and UDP ports, served by a small process in
the pod's network namespace that answers with the pod's name, as upstream agnhost's
`serve-hostname --tcp --udp` does: a TCP connection gets the name and a newline, then is closed;
each UDP datagram is answered with the name.

The lab starts one such process per pod (`nsenter --net=POD-NETNS python -I -S pod_server.py`),
records its PID in the lab's state and stops it by PID with the pod, its node or the lab. This
file is run as a script and imports the standard library only, so it starts in milliseconds.

    >>> served_ports([{"name": "http", "containerPort": 80, "protocol": "TCP"},
    ...               {"name": "dns", "containerPort": 53, "protocol": "UDP"}])
    [('TCP', 80), ('UDP', 53)]
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import selectors
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

PROTOCOLS = ("TCP", "UDP")
READY = "ready"  # the line written on stdout once every port is bound


class ServeError(ValueError):
    """Ports that cannot be served: one line naming the port and the reason."""


def served_ports(ports: Iterable[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """(protocol, port) for each declared port, once each; SCTP cannot be served here.

    >>> served_ports([{"name": "s", "containerPort": 9, "protocol": "SCTP"}])
    Traceback (most recent call last):
    ...
    tulle.lab.pod_server.ServeError: --serve cannot serve port s (9/SCTP): only TCP and UDP can be served here
    >>> served_ports([])
    Traceback (most recent call last):
    ...
    tulle.lab.pod_server.ServeError: --serve needs a port to serve: declare it with --port NAME:NUMBER/PROTO
    """
    out: list[tuple[str, int]] = []
    for port in ports:
        protocol = str(port.get("protocol") or "TCP").upper()
        number = int(port["containerPort"])
        if protocol not in PROTOCOLS:
            # SCTP: the kernels Tulle is built on here have no SCTP sockets; anything else is no protocol.
            name = f"{port.get('name')} ({number}/{protocol})"
            raise ServeError(f"--serve cannot serve port {name}: only TCP and UDP can be served here")
        if (protocol, number) not in out:
            out.append((protocol, number))
    if not out:
        raise ServeError("--serve needs a port to serve: declare it with --port NAME:NUMBER/PROTO")
    return out


def command_args(name: str, ports: Iterable[tuple[str, int]]) -> list[str]:
    """The arguments of this script for a pod's server.

    >>> command_args("web", [("TCP", 80), ("UDP", 53)])
    ['--name', 'web', '--tcp', '80', '--udp', '53']
    """
    args = ["--name", name]
    for protocol, number in ports:
        args += [f"--{protocol.lower()}", str(number)]
    return args


def start(netns: str, name: str, ports: Iterable[tuple[str, int]], log_path: str, timeout: float = 10.0) -> int:
    """Start a pod's server in the network namespace at `netns` and wait until it listens; its
    PID, for the lab to record and stop. Its errors go to `log_path`; ServeError if it cannot start."""
    cmd = ["nsenter", f"--net={netns}", sys.executable, "-I", "-S", os.path.abspath(__file__)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd + command_args(name, ports),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlives the command that started it; stopped by PID
        )
    assert proc.stdout is not None
    with proc.stdout:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    if line == READY:
        return proc.pid
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    with open(log_path, errors="replace") as f:
        lines = f.read().strip().splitlines()
    why = lines[-1].removeprefix("error: ") if lines else f"not listening after {timeout:.0f} s"
    raise ServeError(f"--serve: the server of pod {name} did not start: {why} (see {log_path})")


def _bind(family: int, kind: int, port: int) -> socket.socket | None:
    """A socket bound to every address of the family; None where the pod has no such family."""
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return None
        proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
        raise OSError(exc.errno, f"cannot serve {proto} port {port}: {exc.strerror}") from None
    return sock


def serve(name: str, tcp: list[int], udp: list[int]) -> None:
    answer = name.encode()
    selector = selectors.DefaultSelector()
    for kind, ports in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
        for port in ports:
            for family in (socket.AF_INET, socket.AF_INET6):
                bound = _bind(family, kind, port)
                if bound is not None:
                    selector.register(bound, selectors.EVENT_READ, kind)
    print(READY, flush=True)
    sys.stdout.close()  # the lab waits for that line only
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == socket.SOCK_STREAM:
                    conn, _ = sock.accept()
                    with conn:
                        conn.settimeout(1.0)
                        conn.sendall(answer + b"\n")
                else:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(answer, peer)
            except OSError:
                continue  # a peer that went away, or an ICMP error queued: nothing to answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="answer on TCP and UDP ports with a name")
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.tcp, args.udp)
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
