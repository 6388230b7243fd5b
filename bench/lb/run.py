"""From one backend change to updated ``lb`` KV entries, for 1,000 Services x 10 ports that
share their backends (the case behind cilium/cilium#28845 and #32391).

A real nats-server and SQLite in a temporary directory; the lb service's own objects
(:class:`LbService` with its KV ``endpoints`` mirror and publisher task). Each sample puts one
pod record into KV ``endpoints`` (alternately not ready and ready again, or a new pod) and
stops the clock when the publish round it caused has every KV write acknowledged.

Run from the repository root: ``.venv/bin/python -m bench.lb`` prints a Markdown report;
``--write`` also replaces the "## LB control plane" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ciliate.bus import Bucket, Bus
from ciliate.resources.core import Service
from ciliate.stack.nats import NatsServer
from ciliate.store import Database
from ciliate.store.migrate import upgrade_async
from services.lb.core.allocation import ServiceRanges
from services.lb.core.state import LbState
from services.lb.service import LbService

COMMAND = ".venv/bin/python -m bench.lb --write"
SECTION = "## LB control plane"
BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
GOAL_MS = 100.0


def service(n: int, ports: int) -> Service:
    return Service.model_validate({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"svc-{n}", "namespace": "bench"},
        "spec": {"selector": {"app": "shared"},
                 "clusterIP": f"10.96.{n // 250}.{n % 250 + 1}",
                 "ports": [{"name": f"p{p}", "port": 80 + p, "targetPort": 8000 + p}
                           for p in range(ports)]}})


def pod(n: int, *, ready: bool = True) -> dict[str, Any]:
    return {"id": n, "namespace": "bench", "name": f"pod-{n}", "labels": ["k8s:app=shared"],
            "identity": 1000, "ips": [f"10.244.{n // 250}.{n % 250 + 1}"], "node": "node-1",
            "ports": [], "pod_labels": {"app": "shared"}, "ready": ready}


async def _round(lb: LbService, put: Any) -> tuple[float, int]:
    """Milliseconds from the endpoint put to the end of the round it caused, and its writes."""
    target = lb.rounds + 1
    before = len(lb.kv_keys)
    start = time.perf_counter()
    await put()
    async with lb.round_done:
        await asyncio.wait_for(lb.round_done.wait_for(lambda: lb.rounds >= target), 30)
    elapsed = (time.perf_counter() - start) * 1000
    return elapsed, before


async def measure(services: int, ports: int, pods: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        url = f"sqlite+aiosqlite:///{tmp}/lb.db"
        await upgrade_async(url)
        db = Database(url)
        bus = await Bus.connect(server.url, name="bench-lb")
        try:
            kv = await bus.kv(Bucket.LB)
            endpoints = await bus.kv(Bucket.ENDPOINTS)
            state = LbState()
            lb = LbService(db, kv, endpoints, ServiceRanges.parse(), state)
            for n in range(pods):
                await endpoints.put(f"bench.pod-{n}", pod(n))
            for n in range(services):
                state.set_service(service(n, ports))
            tasks = [asyncio.create_task(lb.mirror.run()), asyncio.create_task(lb.run())]
            lb.wake.set()
            async with lb.round_done:
                await asyncio.wait_for(lb.round_done.wait_for(lambda: lb.rounds >= 1), 120)
            initial_tables = state.builds
            toggles: list[float] = []
            additions: list[float] = []
            puts_per_change: list[int] = []
            for i in range(samples):
                ready = i % 2 == 1
                builds = state.builds
                ms, _ = await _round(lb, lambda r=ready: endpoints.put("bench.pod-0",
                                                                       pod(0, ready=r)))
                toggles.append(ms)
                puts_per_change.append(state.builds - builds)
            for i in range(max(3, samples // 4)):
                n = pods + i
                ms, _ = await _round(lb, lambda n=n: endpoints.put(f"bench.pod-{n}", pod(n)))
                additions.append(ms)
            check = await kv.get(f"svc.bench.svc-{services // 2}")
            live = pods + len(additions)
            if check is None or len(check.value["backends"]) != live * ports:
                raise SystemExit("KV lb does not hold the last published state")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await bus.close()
            await db.close()
            server.stop()
    return {"services": services, "ports": ports, "pods": pods,
            "initial_tables": initial_tables, "toggle": toggles, "add": additions,
            "tables_per_change": statistics.median(puts_per_change)}


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{statistics.median(ordered):.1f} ms (p90 {p90:.1f}, min {ordered[0]:.1f})"


def report(result: dict[str, Any]) -> str:
    s, p = result["services"], result["ports"]
    toggle = statistics.median(result["toggle"])
    add = statistics.median(result["add"])
    verdict = "met" if max(toggle, add) <= GOAL_MS else "NOT met"
    return "\n".join([
        SECTION,
        "",
        f"Command: `{COMMAND}` ({platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}, real nats-server and SQLite).",
        "",
        f"{s:,} Services x {p} ports, one selector over {result['pods']} pods: {s * p:,} "
        f"frontends, {p} distinct backend sets, so {result['initial_tables']} Maglev tables "
        "(M = 16381) shared by all Services. One sample = one pod record put into KV "
        "`endpoints` until every `lb` KV write it caused is acknowledged.",
        "",
        "| change | time to updated KV (median, p90, min) | KV writes |",
        "|---|---|---|",
        f"| pod turns not ready / ready again | {_stats(result['toggle'])} | "
        f"{s} `svc.*` puts + {result['tables_per_change']:.0f} `tbl.*` puts + the old "
        "tables' deletes |",
        f"| new pod (new backend ids from SQL) | {_stats(result['add'])} | same |",
        "",
        f"Goal: <= {GOAL_MS:.0f} ms: **{verdict}**. One put per Service (not per frontend: "
        f"{s * p:,} would be needed) and one per changed table; tables are keyed by a hash of "
        "their members, so the 1,000 Services point at the same 10 tables. Service puts are "
        "pipelined (one acknowledgement per round). Load average during the run: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        "",
    ])


def write_section(text: str) -> None:
    current = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\n"
    start = current.find(SECTION + "\n")
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        following = current.find("\n## ", start + len(SECTION))
        end = len(current) if following < 0 else following + 1
        updated = current[:start] + text + current[end:]
    BENCHMARKS_MD.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lb")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--ports", type=int, default=10)
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.services, args.ports, args.pods, args.samples))
    text = report(result)
    sys.stdout.write(text)
    if args.write:
        write_section(text)
    return 0
