"""Pod registration through REST (``POST /v1/resources`` on identity), PostgreSQL, 1 or 2 replicas.

    .venv/bin/python -m bench.identity.pods [--replicas 1,2] [--pods 3000] [--rate 200]
                                            [--clients 64] [--nodes 50] [--write]

For each replica count: a fresh nats-server and database, the replicas as separate processes
(``python -m ciliate run identity``). Namespaces first, then ``--pods`` pods (``--apps`` label
sets spread over ``--namespaces`` namespaces and ``--nodes`` virtual nodes, no addresses given:
identity allocates them) sent round-robin to the replicas at ``--rate`` per second with at most
``--clients`` requests in flight. Reports the achieved rate (pods acknowledged / seconds from
the first send to the last answer), p50/p99 latency per request, and KV convergence: when KV
``endpoints`` holds every pod, measured from the last answer.

``--write`` replaces the "### Pod registration" part of docs/BENCHMARKS.md "## Identity".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.identity.run import REPO, TOKEN, fresh_database, replicas
from ciliate.bus import Bucket, Bus
from ciliate.stack.nats import NatsServer

GOAL_RATE = 200.0
COMMAND = ".venv/bin/python -m bench.identity.pods --write"
HEADING = "### Pod registration"


@dataclass(frozen=True)
class Outcome:
    replicas: int
    pods: int
    offered: float
    achieved: float
    p50_ms: float
    p99_ms: float
    converged_s: float | None
    failures: dict[int, int]


def pod(index: int, namespaces: int, apps: int, nodes: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"p{index}", "namespace": f"ns{index % namespaces}",
                     "labels": {"app": f"app{index % apps}"}},
        "spec": {"nodeName": f"node{index % nodes}",
                 "containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}]},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def count_endpoints(bus: Bus, want: int, seen: set[str], done: asyncio.Event) -> None:
    """Watch KV ``endpoints`` and set ``done`` once it holds ``want`` keys."""
    kv = await bus.kv(Bucket.ENDPOINTS)
    async for ev in kv.watch():
        if ev.initial_done:
            continue
        if ev.deleted:
            seen.discard(ev.key)
        else:
            seen.add(ev.key)
        if len(seen) >= want:
            done.set()


async def drive(urls: list[str], nats_url: str, args: argparse.Namespace) -> Outcome:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=300)
    latencies: list[float] = []
    failures: dict[int, int] = {}
    bus = await Bus.connect(nats_url, name="bench-pods")
    seen: set[str] = set()
    converged = asyncio.Event()
    watcher = asyncio.create_task(count_endpoints(bus, args.pods, seen, converged))
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=connector) as session:
        for i in range(args.namespaces):
            doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}"}}
            async with session.post(urls[0] + "/v1/resources", json=doc) as resp:
                assert resp.status < 300, await resp.text()
        gate = asyncio.Semaphore(args.clients)

        async def one(index: int) -> None:
            url = urls[index % len(urls)] + "/v1/resources"
            doc = pod(index, args.namespaces, args.apps, args.nodes)
            try:
                t0 = time.perf_counter()
                async with session.post(url, json=doc) as resp:
                    await resp.read()
                    status = resp.status
                latencies.append(time.perf_counter() - t0)
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            finally:
                gate.release()
            if status >= 300 or status == 0:
                failures[status] = failures.get(status, 0) + 1

        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for i in range(args.pods):
            delay = start + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()  # a client is free: the offered rate drops if all are busy
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        answered = time.perf_counter()
    try:
        await asyncio.wait_for(converged.wait(), args.converge_timeout)
        converged_s: float | None = time.perf_counter() - answered
    except TimeoutError:
        converged_s = None
    watcher.cancel()
    await bus.close()
    elapsed = answered - start
    ok = len(latencies) - sum(failures.values())
    return Outcome(
        replicas=len(urls), pods=args.pods, offered=args.rate, achieved=ok / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000, p99_ms=percentile(latencies, 0.99) * 1000,
        converged_s=converged_s, failures=failures,
    )


def run_one(count: int, args: argparse.Namespace) -> Outcome:
    os.environ.setdefault("CILIATE_DB_POOL", str(args.pool))
    with tempfile.TemporaryDirectory(prefix="ciliate-bench-pods-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            with fresh_database() as db_url, replicas(count, server.url, db_url, Path(tmp)) as urls:
                if args.pause:
                    print(f"replicas up: {urls}; press enter to start", flush=True)
                    sys.stdin.readline()
                return asyncio.run(drive(urls, server.url, args))
        finally:
            server.stop()


def report(outcomes: list[Outcome], args: argparse.Namespace, load: float,
           before: str | None) -> str:
    lines = [
        HEADING,
        "",
        f"Command: `{COMMAND} --pods {args.pods} --rate {args.rate:.0f} --clients {args.clients}"
        f"` (add `--before FILE` to keep notes under the table). {args.pods} pods per row "
        f"through `POST /v1/resources` "
        f"(identity, IP from the node's pod CIDR, endpoint id and KV endpoints/identities/ipcache "
        f"per pod), {args.apps} apps over {args.namespaces} namespaces and {args.nodes} virtual "
        f"nodes, offered at {args.rate:.0f}/s round-robin over the replicas with at most "
        f"{args.clients} requests in flight; PostgreSQL, each replica a process with a pool of "
        f"{args.pool}+{args.pool} connections; a fresh nats-server and database per row. "
        f"*Converged*: seconds after the last answer until KV `endpoints` held every pod. "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs shared by the client, the "
        f"replicas, nats-server and PostgreSQL; load average {load:.1f} at start.",
        "",
        "| replicas | offered/s | achieved/s | p50 ms | p99 ms | converged s | failures |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        conv = "not in time" if o.converged_s is None else f"{o.converged_s:.1f}"
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(o.failures.items())) or "none"
        lines.append(f"| {o.replicas} | {o.offered:.0f} | {o.achieved:.0f} | {o.p50_ms:.0f} | "
                     f"{o.p99_ms:.0f} | {conv} | {fails} |")
    best = max(o.achieved for o in outcomes if o.replicas == max(x.replicas for x in outcomes))
    lines += ["", f"Goal: >= {GOAL_RATE:.0f} pods/s with 2 replicas: "
              f"{'met' if best >= GOAL_RATE else 'NOT met'} ({best:.0f}/s).", ""]
    if before:
        lines += [before.rstrip("\n"), ""]
    return "\n".join(lines)


def write_subsection(text: str) -> None:
    """Replace (or add) the subsection under ``## Identity``, leaving the rest alone."""
    path = REPO / "docs" / "BENCHMARKS.md"
    doc = path.read_text()
    pattern = re.compile(rf"^{HEADING}\n.*?(?=^## |^### |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: text + "\n", doc, count=1)
    else:
        section = re.compile(r"^## Identity\n.*?(?=^## |\Z)", re.S | re.M)
        found = section.search(doc)
        if found is None:
            doc = doc.rstrip("\n") + "\n\n## Identity\n\n" + text + "\n"
        else:
            end = found.end()
            doc = doc[:end].rstrip("\n") + "\n\n" + text + "\n" + doc[end:]
    path.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--pods", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=GOAL_RATE)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--apps", type=int, default=25)
    parser.add_argument("--pool", type=int, default=5, help="CILIATE_DB_POOL per replica")
    parser.add_argument("--converge-timeout", type=float, default=120)
    parser.add_argument("--pause", action="store_true", help="wait for enter (to attach py-spy)")
    parser.add_argument("--before", type=Path, help="markdown kept under the table (old numbers)")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    outcomes = []
    for n in (int(x) for x in args.replicas.split(",")):
        outcome = run_one(n, args)
        print(f"replicas={n}: achieved {outcome.achieved:.0f}/s of {args.rate:.0f}, p50 "
              f"{outcome.p50_ms:.0f} ms, p99 {outcome.p99_ms:.0f} ms, converged "
              f"{outcome.converged_s}, failures {outcome.failures}", flush=True)
        outcomes.append(outcome)
    before = args.before.read_text() if args.before else None
    text = report(outcomes, args, load, before)
    print(text)
    if args.write:
        write_subsection(text)


if __name__ == "__main__":
    main()
