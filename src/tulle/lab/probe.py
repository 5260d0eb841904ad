"""Serve and probe TCP and UDP inside network namespaces, for pods that have no processes.

In the lab a pod is a network namespace (a path under /run/netns) with nothing running in it. A
socket belongs for its whole life to the namespace of the thread that created it, whichever thread
uses it later. So every socket here is created in a short-lived thread that entered the namespace
(`run_in_netns`), and is then used from ordinary threads of this process: one selector thread
serves every pod's listeners, and each probe connects from the thread that asked for it.

    >>> pods = {"x/a": "/run/netns/lab-x-a", "x/b": "/run/netns/lab-x-b"}  # doctest: +SKIP
    >>> with ServerSet(pods.values()):  # doctest: +SKIP
    ...     probe("/run/netns/lab-x-a", "10.244.0.66", 80, "TCP")
    True

A probe's verdict is binary: reachable means a TCP handshake completed, or a UDP datagram came back
echoed. A drop, a reset, an ICMP error, or no route all read as unreachable; only a bad argument or
a missing namespace raises.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from tulle.dataplane.netns import run_in_netns

SERVE_PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")

# Linux values; Python 3.11 exports the IPv6 ones but not IP_PKTINFO.
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_ANCILLARY_SIZE = socket.CMSG_SPACE(_IN6_PKTINFO.size)
_DATAGRAM_MAX = 2048


class ServerSet:
    """TCP and UDP servers on the given ports, both families, in each given network namespace.

    TCP connections are accepted and closed at once (the probe only needs the handshake); UDP
    datagrams are echoed back from the address they were sent to. After stop(), or a start() that
    failed, no socket of ours is left open.

    >>> with ServerSet(["/run/netns/lab-x-a"]) as servers:  # doctest: +SKIP
    ...     servers.listening
    8
    """

    def __init__(
        self,
        netns_paths: Iterable[str],
        ports: Iterable[int] = SERVE_PORTS,
        families: Iterable[int] = (4, 6),
    ) -> None:
        self._paths = tuple(netns_paths)
        self._ports = tuple(ports)
        self._families = tuple(families)
        self._sockets: list[socket.socket] = []
        self._selector: selectors.BaseSelector | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> int:
        """How many listening sockets are open (namespaces x families x ports x 2 when started)."""
        return len(self._sockets)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this ServerSet is already started; stop() it first")
        try:
            for path in self._paths:
                self._sockets.extend(run_in_netns(path, functools.partial(self._open_listeners, path)))
            self._selector = selectors.DefaultSelector()
            self._wake = socket.socketpair()
            self._selector.register(self._wake[0], selectors.EVENT_READ, None)
            for sock in self._sockets:
                handler = self._accept if sock.type == socket.SOCK_STREAM else self._echo
                self._selector.register(sock, selectors.EVENT_READ, handler)
        except BaseException:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._serve, name="probe servers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._wake is not None:
            self._wake[1].send(b"x")
            self._thread.join()
        self._thread = None
        self._close_all()

    def __enter__(self) -> ServerSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _open_listeners(self, path: str) -> list[socket.socket]:
        """Run inside the namespace at path: every listener it needs, or none at all."""
        opened: list[socket.socket] = []
        try:
            for family in self._families:
                for port in self._ports:
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        opened.append(_listener(path, family, kind, port))
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        return opened

    def _serve(self) -> None:
        assert self._selector is not None
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return
                key.data(key.fileobj)

    @staticmethod
    def _accept(listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                continue  # the peer gave up before we got to it
            conn.close()

    @staticmethod
    def _echo(sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _, peer = sock.recvmsg(_DATAGRAM_MAX, _ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket; nothing to answer
            try:
                sock.sendmsg([data], _reply_source(ancillary), 0, peer)
            except OSError:
                pass  # the prober sees no echo, which is the verdict it should see

    def _close_all(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for sock in (*self._sockets, *(self._wake or ())):
            sock.close()
        self._sockets = []
        self._wake = None


def _listener(path: str, family: int, kind: int, port: int) -> socket.socket:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    host = "::" if family == 6 else "0.0.0.0"
    sock = socket.socket(af, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            # Learn each datagram's destination address so the echo leaves from it.
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
        raise OSError(
            exc.errno,
            f"cannot serve {proto} [{host}]:{port} in {path}: {exc.strerror} (is another server there?)",
        ) from exc
    return sock


def _reply_source(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes the echo leave from the address the datagram was sent to."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, _, destination = _IN_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, destination, bytes(4)))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
            destination, ifindex = _IN6_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(destination, ifindex))]
    return []


def probe(src_netns_path: str, dst_ip: str, port: int, protocol: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection (or a UDP echo) from inside src_netns_path to dst_ip:port succeeds.

    >>> probe("/run/netns/lab-x-a", "fd00:244::42", 81, "UDP", timeout=1.0)  # doctest: +SKIP
    False
    """
    address = ipaddress.ip_address(dst_ip)
    proto = protocol.upper()
    if proto not in PROTOCOLS:
        raise ValueError(f"cannot probe protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    af = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    sock = run_in_netns(src_netns_path, lambda: socket.socket(af, kind))
    with sock:
        if proto == "TCP":
            return _probe_tcp(sock, (str(address), port), timeout)
        return _probe_udp(sock, (str(address), port), timeout)


def _probe_tcp(sock: socket.socket, target: tuple[str, int], timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        return False
    # Close with a reset: no TIME_WAIT left behind by thousands of probes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return True


def _probe_udp(sock: socket.socket, target: tuple[str, int], timeout: float) -> bool:
    token = os.urandom(16)
    deadline = time.monotonic() + timeout
    resend_every = timeout / 3  # a lost datagram must not read as a policy drop
    try:
        sock.connect(target)
    except OSError:
        return False
    while (now := time.monotonic()) < deadline:
        try:
            sock.send(token)
        except OSError:
            return False  # refused (an earlier ICMP error) or dropped on the way out
        wait_until = min(deadline, now + resend_every)
        while (remaining := wait_until - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                if sock.recv(_DATAGRAM_MAX) == token:
                    return True
            except TimeoutError:
                break
            except OSError:
                return False  # ICMP port or host unreachable
    return False


def probe_matrix(
    pods: Mapping[str, str],
    addresses: Mapping[str, str],
    port: int,
    protocol: str,
    timeout: float = 1.0,
    *,
    prober: Callable[[str, str, int, str, float], bool] = probe,
) -> dict[tuple[str, str], bool]:
    """Probe from every pod in pods (name -> netns path) to every address (name -> IP), all at once.

    All probes run concurrently, so a matrix takes about one timeout however many cells are blocked.

    >>> probe_matrix({"x/a": "/run/netns/lab-x-a"}, {"x/b": "10.244.0.66"}, 80, "TCP")  # doctest: +SKIP
    {('x/a', 'x/b'): True}
    """
    pairs = [(src, dst) for src in pods for dst in addresses]
    if not pairs:
        return {}
    with ThreadPoolExecutor(max_workers=len(pairs), thread_name_prefix="probe") as pool:
        futures = {
            (src, dst): pool.submit(prober, pods[src], addresses[dst], port, protocol, timeout) for src, dst in pairs
        }
        return {pair: future.result() for pair, future in futures.items()}


def sctp_init_seen(src_netns_path: str, dst_netns_path: str, dst_ip: str, port: int, timeout: float = 0.5) -> bool:
    """Send a crafted SCTP INIT from one namespace and look for it on a raw socket in another.

    This kernel has no SCTP sockets, so SCTP traffic can only be crafted (scapy builds the
    packet) and observed raw; True if the INIT arrived at the destination namespace.
    """
    import secrets

    from scapy.layers.sctp import SCTP, SCTPChunkInit

    family = ipaddress.ip_address(dst_ip).version
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    chunk = SCTPChunkInit(init_tag=secrets.randbits(31) | 1, init_tsn=1)
    packet = bytes(SCTP(sport=40000 + port % 1000, dport=port, tag=0) / chunk)
    sniffer = run_in_netns(dst_netns_path, lambda: socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_SCTP))
    sniffer.settimeout(timeout)
    try:

        def send() -> None:
            with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_SCTP) as s:
                s.sendto(packet, (dst_ip, 0))

        run_in_netns(src_netns_path, send)
        try:
            while True:
                data = sniffer.recv(2048)
                payload = data[(data[0] & 0x0F) * 4 :] if family == 4 else data  # raw IPv4 includes the header
                if payload[2:4] == port.to_bytes(2, "big") and payload[12] == 1:  # chunk type 1: INIT
                    return True
        except TimeoutError:
            return False
    finally:
        sniffer.close()
