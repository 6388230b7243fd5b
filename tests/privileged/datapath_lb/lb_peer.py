"""Test peer run inside pod/node namespaces (as a script): ``serve NAME TCPPORT UDPPORT`` answers
TCP connections and UDP datagrams with NAME; ``tcp IP PORT N`` / ``udp IP PORT N`` connect N
times and print a JSON object {answer: count, "errors": {errno name: count}, "peers": [...]};
``sniff IFACE CLIENT_IP BACKEND_IP`` counts IPv4 frames arriving on IFACE until a line on
stdin, then prints {"from_client": n, "replies": n} (replies: from the backend or to the
client); ``reuse SPORT IP PORT BACKENDS`` connects from source port SPORT to the service, closes
with RST, then connects from the same port straight to the backend that answered (BACKENDS: JSON
name -> [ip, port]) and prints {"service": name, "direct": answer or errno name}."""

from __future__ import annotations

import errno
import json
import socket
import sys
import threading
from typing import Any


def serve(name: str, tcp_port: int, udp_port: int) -> None:
    reply = name.encode() + b"\n"
    ts = socket.socket()
    ts.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ts.bind(("0.0.0.0", tcp_port))
    ts.listen(512)
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    us.bind(("0.0.0.0", udp_port))

    def udp_loop() -> None:
        while True:
            _data, addr = us.recvfrom(2048)
            us.sendto(reply, addr)

    def conn(c: socket.socket) -> None:
        try:
            c.sendall(reply)
            while c.recv(4096):
                c.sendall(b"ok\n")
        except OSError:
            pass
        finally:
            c.close()

    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        c, _ = ts.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()


def client(kind: str, ip: str, port: int, n: int) -> None:
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    peers: set[str] = set()
    for _ in range(n):
        try:
            if kind == "tcp":
                with socket.create_connection((ip, port), timeout=2) as s:
                    peers.add("{}:{}".format(*s.getpeername()))
                    ans = s.makefile().readline().strip()
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(2)
                    s.sendto(b"hi", (ip, port))
                    data, addr = s.recvfrom(2048)
                    peers.add(f"{addr[0]}:{addr[1]}")
                    ans = data.decode().strip()
            counts[ans] = counts.get(ans, 0) + 1
        except OSError as e:
            key = errno.errorcode.get(e.errno or 0, type(e).__name__)
            errors[key] = errors.get(key, 0) + 1
    print(json.dumps({"answers": counts, "errors": errors, "peers": sorted(peers)}))


def _connect_from(sport: int, ip: str, port: int) -> str:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.settimeout(2)
    try:
        s.bind(("0.0.0.0", sport))
        s.connect((ip, port))
        return s.makefile().readline().strip()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, type(e).__name__)
    finally:
        s.close()  # RST: the port is free again at once


def reuse(sport: int, ip: str, port: int, backends: dict[str, list[Any]]) -> None:
    name = _connect_from(sport, ip, port)
    direct = _connect_from(sport, *backends[name]) if name in backends else "no service answer"
    print(json.dumps({"service": name, "direct": direct}))


def hold(ip: str, port: int, n: int) -> None:
    """Open n connections, print their answers, wait for a line on stdin, then check each
    connection still answers (prints a JSON list of booleans)."""
    conns = [socket.create_connection((ip, port), timeout=2) for _ in range(n)]
    files = [c.makefile("rb") for c in conns]
    print(json.dumps([f.readline().decode().strip() for f in files]), flush=True)
    sys.stdin.readline()
    alive = []
    for c, f in zip(conns, files, strict=True):
        try:
            c.sendall(b"ping\n")
            alive.append(f.readline().strip() == b"ok")
        except OSError:
            alive.append(False)
    print(json.dumps(alive), flush=True)


def sniff(iface: str, client_ip: str, backend_ip: str) -> None:
    import select

    eth_p_all, packet_outgoing = 0x0003, 4
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
    s.bind((iface, 0))
    client, backend = socket.inet_aton(client_ip), socket.inet_aton(backend_ip)
    counts = {"from_client": 0, "replies": 0}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in ready:
            break
        frame, addr = s.recvfrom(65535)
        if addr[2] == packet_outgoing or frame[12:14] != b"\x08\x00":
            continue
        src, dst = frame[26:30], frame[30:34]
        if src == client:
            counts["from_client"] += 1
        elif src == backend or dst == client:
            counts["replies"] += 1
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "sniff":
        sniff(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "reuse":
        reuse(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
    elif sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        client(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
