"""Control-plane load on the embedded stack (no agents, no sandboxes): concurrent applies of
mixed kinds, then pods registered at a fixed rate over many virtual nodes with Services and
NetworkPolicies over them. Reports convergence time and each service's peak memory (VmHWM).

    .venv/bin/python -m bench.reliability.run [--pods 10000 --rate 200 --nodes 50]
                                              [--db postgres|sqlite] [--identity-replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from ciliate.bus import Bucket, Bus
from ciliate.stack.supervisor import Stack, StackConfig

PG = "postgresql://postgres@127.0.0.1:5432"
SERVICES = ("identity", "policy", "lb", "events")


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def pod(ns: str, name: str, app: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
                                                       "ports": [{"containerPort": 80}]}]}}


def service(ns: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 80}]}}


def netpol(ns: str, app: str, peer: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{app}-from-{peer}", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                                  "ports": [{"port": 80, "protocol": "TCP"}]}]}}


class Load:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.urls = {s: [c.url for c in stack.children if c.service == s] for s in SERVICES}
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=aiohttp.ClientTimeout(total=120),
            connector=aiohttp.TCPConnector(limit=200))
        self.turn = 0
        self.statuses: dict[int, int] = {}
        self.refusals: list[str] = []
        self.pods_ok = 0
        self.latencies: list[float] = []
        """Seconds per answered apply, in the order the answers came."""
        self.answered_at: list[float] = []

    async def apply(self, doc: dict[str, Any]) -> int:
        owner = {"Pod": "identity", "Namespace": "identity", "Service": "lb",
                 "NetworkPolicy": "policy"}[doc["kind"]]
        urls = self.urls[owner]
        self.turn += 1
        url = urls[self.turn % len(urls)]
        began = time.monotonic()
        try:
            async with self.session.post(url + "/v1/resources", json=doc) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.statuses[0] = self.statuses.get(0, 0) + 1
            if len(self.refusals) < 5:
                self.refusals.append(f"{doc['kind']} no answer: {exc!r}")
            return 0
        resp_status = status
        if resp_status >= 300 and len(self.refusals) < 5:
            self.refusals.append(f"{doc['kind']} {resp_status} {body[:300]!r}")
        self.statuses[resp_status] = self.statuses.get(resp_status, 0) + 1
        if doc["kind"] == "Pod" and resp_status < 300:
            self.pods_ok += 1
        self.latencies.append(time.monotonic() - began)
        self.answered_at.append(time.monotonic())
        return resp_status


async def kv_count(bus: Bus, bucket: Bucket) -> dict[str, Any]:
    return await (await bus.kv(bucket)).items()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg  # type: ignore[import-untyped]

    dbname = f"ciliate_bench_{secrets.token_hex(4)}"
    admin = None
    if args.db == "postgres":
        admin = await asyncpg.connect(f"{PG}/test")
        await admin.execute(f'CREATE DATABASE "{dbname}"')
    state = Path(tempfile.mkdtemp(prefix="ciliate-rel-bench-"))
    stack = Stack(StackConfig(state_dir=state, nodes=args.nodes, agents=False,
                              services=SERVICES, replicas={"identity": args.identity_replicas},
                              db_url=f"{PG}/{dbname}" if admin is not None else None))
    result: dict[str, Any] = {"db": args.db, "pods": args.pods, "rate": args.rate,
                              "nodes": args.nodes, "identity_replicas": args.identity_replicas,
                              "loadavg_start": await asyncio.to_thread(loadavg)}
    try:
        await asyncio.to_thread(stack.start)
        assert await asyncio.to_thread(stack.wait_ready, 120)
        load = Load(stack)
        bus = await Bus.connect(stack.nats.url, name="bench", user="cli",
                                password=stack.nats_passwords["cli"])
        namespaces = [f"ns{i}" for i in range(args.namespaces)]
        apps = [f"app{i}" for i in range(args.apps)]
        for ns in namespaces:
            await load.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

        # 1. concurrent applies of mixed kinds
        mixed: list[dict[str, Any]] = []
        for i in range(args.concurrent):
            ns, app = namespaces[i % len(namespaces)], apps[i % len(apps)]
            kind = i % 4
            if kind == 0:
                mixed.append(service(ns, app))
            elif kind == 1:
                mixed.append(netpol(ns, app, apps[(i + 1) % len(apps)]))
            else:
                mixed.append(pod(ns, f"m{i}", app, stack.nodes[i % len(stack.nodes)]))
        selected = {(f"k8s:app={d['spec']['podSelector']['matchLabels']['app']}",
                     f"k8s:io.kubernetes.pod.namespace={d['metadata']['namespace']}")
                    for d in mixed if d["kind"] == "NetworkPolicy"}
        started = time.monotonic()
        codes = await asyncio.gather(*(load.apply(d) for d in mixed))
        result["concurrent"] = {
            "applies": len(mixed), "seconds": round(time.monotonic() - started, 2),
            "codes": {str(c): codes.count(c) for c in sorted(set(codes))}}

        # 2. pods at a fixed rate
        load.latencies.clear()
        load.answered_at.clear()
        started = time.monotonic()
        pending: set[asyncio.Task[int]] = set()
        for i in range(args.pods):
            due = started + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            doc = pod(namespaces[i % len(namespaces)], f"p{i}", apps[i % len(apps)],
                      stack.nodes[i % len(stack.nodes)])
            task = asyncio.create_task(load.apply(doc))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent = time.monotonic() - started
        await asyncio.gather(*pending)
        acked = time.monotonic() - started
        expected = load.pods_ok  # every pod whose apply was acknowledged; refusals reported
        result["pods_offered"] = args.pods + sum(1 for d in mixed if d["kind"] == "Pod")
        converged: dict[str, float] = {}
        deadline = time.monotonic() + args.converge_timeout
        while time.monotonic() < deadline and len(converged) < 3:
            now = time.monotonic() - started
            if "endpoints" not in converged:
                eps = await kv_count(bus, Bucket.ENDPOINTS)
                if len(eps) >= expected:
                    converged["endpoints"] = now
                    identities = {v["identity"] for v in eps.values()
                                  if any(set(pair) <= set(v["labels"]) for pair in selected)}
            if "endpoints" in converged and "policy" not in converged:
                pol = await kv_count(bus, Bucket.POLICY)
                with_entries = {int(k) for k, v in pol.items() if v.get("entries")}
                if identities and identities <= with_entries:
                    converged["policy"] = now
                    result["policy_keys"] = len(pol)
            if "lb" not in converged:
                lb = await kv_count(bus, Bucket.LB)
                if len(lb) > 0 and "endpoints" in converged:
                    converged["lb"] = now
                    result["lb_keys"] = len(lb)
            await asyncio.sleep(1)
        lat = sorted(load.latencies)
        per_10s: dict[int, int] = {}
        for at in load.answered_at:
            window = int((at - started) // 10) * 10
            per_10s[window] = per_10s.get(window, 0) + 1
        result["register_latency_ms"] = {
            q: round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1000) if lat else None
            for q, f in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
        result["answers_per_10s"] = per_10s
        result["register"] = {"sent_seconds": round(sent, 1), "acked_seconds": round(acked, 1),
                              "statuses": load.statuses, "refusals": load.refusals}
        result["converged_seconds"] = {k: round(v, 1) for k, v in converged.items()}
        result["endpoints_in_kv"] = len(await kv_count(bus, Bucket.ENDPOINTS))
        result["expected_endpoints"] = expected
        result["peak_rss_mib"] = {
            f"{c.service}/{c.replica}": round(proc_kib(c.proc.pid, "VmHWM") / 1024, 1)
            for c in stack.children if c.proc is not None}
        result["cpu_seconds"] = {
            f"{c.service}/{c.replica}": round(cpu_seconds(c.proc.pid), 1)
            for c in stack.children if c.proc is not None}
        result["rss_mib_now"] = {
            f"{c.service}/{c.replica}": round(proc_kib(c.proc.pid, "VmRSS") / 1024, 1)
            for c in stack.children if c.proc is not None}
        await load.session.close()
        await bus.close()
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(state, ignore_errors=True)
        if admin is not None:
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            await admin.close()
    result["loadavg_end"] = await asyncio.to_thread(loadavg)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--apps", type=int, default=25)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--identity-replicas", type=int, default=2)
    parser.add_argument("--converge-timeout", type=float, default=600)
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres",
                        help="sqlite: the stack's default database file in the state dir")
    args = parser.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
