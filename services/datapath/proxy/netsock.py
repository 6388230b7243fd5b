"""Sockets for the transparent proxy, created inside the node's network namespace.

A socket belongs to the namespace it was made in, so the proxy process may live anywhere:
``make_socket(netns, ...)`` switches this thread into ``netns`` (``setns``), creates the socket
and switches back, with no await in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)
_LOCK = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in ``netns`` (None: stay put)."""
    if not netns:
        yield
        return
    with _LOCK:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"{NETNS_DIR}/{netns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def make_socket(netns: str | None, kind: int, *, transparent: bool = False) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listener(netns: str | None, host: str, port: int, kind: int = socket.SOCK_STREAM,
             *, transparent: bool = True) -> socket.socket:
    """A (transparent) TCP listener or UDP socket bound to host:port in ``netns``."""
    sock = make_socket(netns, kind, transparent=transparent)
    try:
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def orig_dst_from_cmsg(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination of a datagram (IP_ORIGDSTADDR: a sockaddr_in)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = int.from_bytes(data[2:4], "big")
            return socket.inet_ntoa(data[4:8]), port
    return None
