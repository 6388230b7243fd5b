"""L7 proxy benchmark: HTTP requests/s and p50/p99 added latency, through the proxy vs direct.

One run, keep-alive on: the demo deathstar server and the proxy each run in their own process
on loopback (the proxy in non-transparent mode with a fixed original destination and one
POST rule, so rule matching, parsing and flow building are all paid). The client paces
requests at ``--rate`` per second over one keep-alive connection per path, alternating
direct and proxied requests so both see the same machine state, then measures the maximum
rate through the proxy with ``--conns`` concurrent keep-alive connections.

    python -m bench.l7 [--rate 1000] [--seconds 5] [--conns 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

REQUEST = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 0\r\n\r\n"


async def _serve_proxy(port: int, upstream: int) -> None:
    from services.datapath.proxy.core.policy import PolicyView
    from services.datapath.proxy.http_proxy import HTTPProxy

    view = PolicyView(node="bench")
    view.set_endpoint("default.deathstar", {"identity": 1000, "ips": ["127.0.0.1"],
                                            "node": "bench", "name": "deathstar-1"})
    view.set_policy("1000", {"identity": 1000, "enforce": {"ingress": True}, "entries": [
        {"peer": 0, "direction": "ingress", "proto": 6, "port": upstream, "port_prefixlen": 16,
         "deny": False, "proxy_port": port, "cookies": ["bench"],
         "l7": {"http": [{"method": "POST", "path": "/v1/request-landing"}]}}]})
    flows: list[Any] = []

    def emit(w: Any) -> None:
        flows.append(w)
        if len(flows) > 10000:
            flows.clear()

    proxy = HTTPProxy(view, emit, port=port, host="127.0.0.1", transparent=False,
                      original_dst=lambda _c, _l: ("127.0.0.1", upstream))
    await proxy.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    t0 = time.perf_counter()
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return time.perf_counter() - t0


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _paced(server_port: int, proxy_port: int, rate: int, seconds: float) -> dict[str, Any]:
    direct = await asyncio.open_connection("127.0.0.1", server_port)
    proxied = await asyncio.open_connection("127.0.0.1", proxy_port)
    lat: dict[str, list[float]] = {"direct": [], "proxy": []}
    interval = 1.0 / rate
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        target = start + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        name, conn = ("direct", direct) if i % 2 == 0 else ("proxy", proxied)
        lat[name].append(await _one(*conn))
    elapsed = time.perf_counter() - start
    for _, w in (direct, proxied):
        w.close()
    out: dict[str, Any] = {"offered_rate": rate, "achieved_rate": round(n / elapsed)}
    for name, values in lat.items():
        out[name] = {"p50_us": round(_pct(values, 0.5) * 1e6), "p99_us": round(
            _pct(values, 0.99) * 1e6), "n": len(values)}
    out["added_p50_us"] = out["proxy"]["p50_us"] - out["direct"]["p50_us"]
    out["added_p99_us"] = out["proxy"]["p99_us"] - out["direct"]["p99_us"]
    return out


async def _max_rate(port: int, conns: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        conn = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            await _one(*conn)
            done += 1
        conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done / (time.perf_counter() - t0)


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"{args} did not start")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--server-port", type=int, default=18080)
    parser.add_argument("--proxy-port", type=int, default=18081)
    parser.add_argument("--serve-proxy", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.serve_proxy:
        asyncio.run(_serve_proxy(a.proxy_port, a.server_port))
        return
    server = _start(["-m", "services.datapath.proxy.demo", "127.0.0.1", str(a.server_port)])
    proxy = None
    try:
        proxy = _start(["-m", "bench.l7", "--serve-proxy", "--proxy-port", str(a.proxy_port),
                        "--server-port", str(a.server_port)])
        result = asyncio.run(_paced(a.server_port, a.proxy_port, a.rate, a.seconds))
        result["max_rps_direct"] = round(asyncio.run(
            _max_rate(a.server_port, a.conns, a.seconds / 2)))
        result["max_rps_proxy"] = round(asyncio.run(
            _max_rate(a.proxy_port, a.conns, a.seconds / 2)))
        print(json.dumps(result, indent=2))
    finally:
        for proc in (proxy, server):
            if proc is not None:
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


if __name__ == "__main__":
    main()
