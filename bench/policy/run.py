"""Policy benchmark: full compile of 1,000 identities x 500 policies, and the latency from one
new identity in KV ``identities`` to its entries in KV ``policy`` (NATS round trips included).

The service runs as its own process (``python -m services.policy``), as in a deployment, so
the benchmark's own watchers do not share its event loop; its peak memory is read from
``/proc/PID/status`` (VmHWM).

Run from the repository root: ``.venv/bin/python -m bench.policy [--samples N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from ciliate.bus import Bucket, Bus, codec
from ciliate.bus.subjects import IDENTITY_ALLOCATE
from ciliate.config import Settings
from ciliate.labels import CIDR_IDENTITY_BASE, LabelSet
from ciliate.labels.k8s import endpoint_labels
from ciliate.resources.registry import parse_resource
from ciliate.stack.nats import NatsServer
from ciliate.stack.ports import free_port
from ciliate.store import Database, ResourceRepository
from ciliate.store.database import sqlite_url
from ciliate.store.migrate import upgrade_async
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.spec import normalize
from services.policy.core.synthetic import GROUPS, TIERS, generate
from services.policy.core.world import SequentialCIDRAllocator, reserved_identities

TOKEN = "bench"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of another process (Linux)."""
    return _proc_status_mb(pid, "VmHWM")


def vm_rss_mb(pid: int) -> float:
    """Current resident memory of another process (Linux)."""
    return _proc_status_mb(pid, "VmRSS")


def full_compile(seed: int) -> dict[str, Any]:
    synthetic = generate(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    policy_set = normalize([parse_resource(d) for d in synthetic.policy_docs])  # type: ignore[misc]
    t1 = time.perf_counter()
    engine = PolicyEngine(policy_set,
                          IdentityWorld({**reserved_identities(), **synthetic.identities}),
                          allocate_cidr=SequentialCIDRAllocator())
    result = engine.compile_all()
    t2, c2 = time.perf_counter(), time.process_time()
    sizes = [len(p.entries) for p in result.policies.values()]
    return {
        "identities": len(synthetic.identities),
        "policies": len(synthetic.policy_docs),
        "rules": len(policy_set.rules),
        "parse_normalize_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "total_wall_s": round(t2 - t0, 3),
        "total_cpu_s": round(c2 - c0, 3),
        "entries_total": sum(sizes),
        "entries_max": max(sizes),
        "entries_mean": round(statistics.mean(sizes), 1),
        "overflows": len(result.overflows),
    }


async def _store_policies(db_url: str, docs: list[dict[str, Any]]) -> None:
    db = Database(db_url)
    async with db.unit_of_work() as uow:
        repo = ResourceRepository(uow.session)
        for doc in docs:
            res = parse_resource(doc)
            await repo.apply(res.model_dump(mode="json", by_alias=True, exclude_none=True))
        await uow.commit()
    await db.close()


async def incremental(seed: int, samples: int, state: Path, churn: int = 0) -> dict[str, Any]:
    synthetic = generate(seed)
    nats = NatsServer(state)
    nats.start()
    db_url = sqlite_url(state / "ciliate.db")
    await upgrade_async(db_url)
    await _store_policies(db_url, synthetic.policy_docs)
    bus = await Bus.connect(nats.url, name="bench")
    ident_kv = await bus.kv(Bucket.IDENTITIES)
    all_ids = {**reserved_identities(), **synthetic.identities}
    for ident, labels in all_ids.items():
        await ident_kv.put(str(ident), {"id": ident, "labels": labels.sorted_strings()})
    assigned: dict[str, int] = {}

    async def allocate(payload: Any) -> Any:
        """Stands in for the identity service: CIDR identities into KV ``identities``."""
        ids = []
        for labels in payload["labels"]:
            key = ";".join(sorted(labels))
            ident = assigned.setdefault(key, CIDR_IDENTITY_BASE + 1 + len(assigned))
            await ident_kv.put(str(ident), {"id": ident, "labels": sorted(labels)})
            ids.append(ident)
        return {"ids": ids}

    await bus.serve(IDENTITY_ALLOCATE, allocate)
    arrivals: dict[str, float] = {}
    sizes: dict[str, int] = {}
    policy_kv = await bus.kv(Bucket.POLICY)

    arrived = asyncio.Event()

    async def watch() -> None:
        async for ev in policy_kv.watch():
            if ev.key and not ev.deleted:
                arrivals.setdefault(ev.key, time.perf_counter())
                sizes[ev.key] = len(codec.pack(ev.value))
                arrived.set()

    async def until_arrived(keys: set[str]) -> None:
        while not keys <= set(arrivals):
            arrived.clear()
            await arrived.wait()

    watcher = asyncio.create_task(watch())
    port = free_port()
    settings = Settings(nats_url=nats.url, db_url=db_url, token=TOKEN, node="bench",
                        state_dir=state, http_port=port)
    started = time.perf_counter()
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.policy", "--nats-url", settings.nats_url,
        "--db-url", settings.db_url, "--token", TOKEN, "--node", settings.node,
        "--state-dir", str(state), "--http-port", str(port),
        env={**os.environ, "CILIATE_LOG_LEVEL": "WARNING"})
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})

    async def status() -> dict[str, Any]:
        deadline = time.monotonic() + 600  # a saturated service answers late, not never
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/v1/status") as resp:
                    return await resp.json()  # type: ignore[no-any-return]
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.01)  # polling a remote, with a deadline
        raise RuntimeError("the policy service never answered")

    await asyncio.wait_for(until_arrived({str(i) for i in synthetic.identities}), 600)
    first_publish = time.perf_counter() - started
    watcher.cancel()
    value_sizes = sorted(sizes.values())
    print(f"all {len(synthetic.identities)} maps published after {first_publish:.1f} s "
          f"({sum(value_sizes) / 1e6:.1f} MB)", file=sys.stderr)
    own: list[float] = []
    settled: list[float] = []
    inside: list[float] = []  # the service's own measure: identity event -> put acknowledged
    admit: list[float] = []  # compile of the new identity's own map, in the service
    rss_by_sample: dict[int, float] = {}  # VmHWM after that many new identities
    for n in range(samples):
        ident = 100_000 + n
        ns = f"bench-new-{n}"
        new_labels: LabelSet = endpoint_labels(
            {"app": "new", "tier": f"t{n % TIERS}", "group": f"g{n % GROUPS}"}, ns,
            {"kubernetes.io/metadata.name": ns})
        before = await status()
        key_watch = policy_kv.watch(str(ident))  # this key only: no backlog of other keys
        first = await anext(key_watch)  # the resync marker: the watch is in place
        assert first.resync
        t0 = time.perf_counter()
        await ident_kv.put(str(ident), {"id": ident, "labels": new_labels.sorted_strings()})
        async for ev in key_watch:
            if ev.key == str(ident) and not ev.deleted:
                own.append(time.perf_counter() - t0)
                break
        await key_watch.aclose()  # type: ignore[attr-defined]
        for _ in range(100_000):  # the compile that took it in has published everything
            now = await status()
            if (now.get("compiles", 0) > before.get("compiles", 0)
                    and now.get("settled", 0) > before.get("settled", 0)
                    and not now.get("publish_pending")):
                break
            await asyncio.sleep(0.002)
        settled.append(time.perf_counter() - t0)
        inside.append(float(now.get("own_map_ms", 0.0)))
        admit.append(float(now.get("admit_ms", 0.0)))
        if n + 1 in (1, 10, 25, 50, 100, 200, 400, samples):
            rss_by_sample[n + 1] = vm_hwm_mb(service.pid)
        print(f"sample {n}: own {own[-1] * 1000:.1f} ms (in the service {inside[-1]:.1f} ms, "
              f"its compile {admit[-1]:.1f} ms), "
              f"all deltas {settled[-1] * 1000:.0f} ms", file=sys.stderr)
    service_peak_mb = vm_hwm_mb(service.pid)

    async def settle(before: dict[str, Any]) -> None:
        for _ in range(1_000_000):
            now = await status()
            if (now.get("settled", 0) > before.get("settled", 0)
                    and not now.get("publish_pending")):
                return
            await asyncio.sleep(0.01)

    churn_report: list[dict[str, Any]] = []
    live = [100_000 + n for n in range(samples)]
    for round_ in range(1, churn + 1):  # the same number of pods go, then as many new come
        t0 = time.perf_counter()
        before = await status()
        for ident in live:
            await ident_kv.delete(str(ident))
        await settle(before)
        removed_s = time.perf_counter() - t0
        rss_removed = vm_rss_mb(service.pid)
        live = [100_000 + round_ * samples + n for n in range(samples)]
        t0 = time.perf_counter()
        before = await status()
        for ident in live:
            n = ident - 100_000
            ns = f"bench-new-{n}"
            labels = endpoint_labels(
                {"app": "new", "tier": f"t{n % TIERS}", "group": f"g{n % GROUPS}"}, ns,
                {"kubernetes.io/metadata.name": ns})
            await ident_kv.put(str(ident), {"id": ident, "labels": labels.sorted_strings()})
        await settle(before)
        churn_report.append({
            "round": round_, "removed_all_settled_s": round(removed_s, 2),
            "rss_mb_after_removal": rss_removed,
            "added_all_settled_s": round(time.perf_counter() - t0, 2),
            "rss_mb_after_readding": vm_rss_mb(service.pid),
            "peak_rss_mb": vm_hwm_mb(service.pid)})
        print(f"churn round {round_}: {churn_report[-1]}", file=sys.stderr)
    final = await status()
    await session.close()  # no keep-alive connection for the service's shutdown to wait on
    service_rss_mb = vm_rss_mb(service.pid)
    stopping = time.perf_counter()
    service.terminate()
    try:
        await asyncio.wait_for(service.wait(), 15)
        stop_s: float | None = round(time.perf_counter() - stopping, 2)
    except TimeoutError:
        print("the service did not stop within 15 s of SIGTERM; killed", file=sys.stderr)
        stop_s = None
        service.kill()
        await service.wait()
    watcher.cancel()
    await bus.close()
    nats.stop()
    own_ms = sorted(x * 1000 for x in own)
    settled_ms = sorted(x * 1000 for x in settled)

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {
        "samples": samples,
        "startup_to_all_published_s": round(first_publish, 2),
        "value_bytes_mean": round(statistics.mean(value_sizes)),
        "value_bytes_max": value_sizes[-1],
        "puts_total": final.get("puts"),
        "service_peak_rss_mb": service_peak_mb,
        "service_rss_mb_at_end": service_rss_mb,
        "service_peak_rss_mb_by_sample": rss_by_sample,
        "service_stop_after_sigterm_s": stop_s,
        "churn": churn_report,
        "own_entries_p50_ms": pct(own_ms, 0.5),
        "own_entries_p99_ms": pct(own_ms, 0.99),
        "own_entries_in_service_p50_ms": pct(sorted(inside), 0.5),
        "own_entries_in_service_p99_ms": pct(sorted(inside), 0.99),
        "own_compile_in_service_p50_ms": pct(sorted(admit), 0.5),
        "own_compile_in_service_p99_ms": pct(sorted(admit), 0.99),
        "service_gc_pause_max_ms": final.get("gc_pause_max_ms"),
        "service_gc_full_collections": final.get("gc_full"),
        "all_deltas_p50_ms": pct(settled_ms, 0.5),
        "all_deltas_p99_ms": pct(settled_ms, 0.99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--churn", type=int, default=2,
                        help="rounds of removing the sample pods' identities and adding as many "
                             "new ones in a burst, after the samples (memory must not grow)")
    args = parser.parse_args()
    compile_runs = [full_compile(args.seed) for _ in range(3)]
    print(json.dumps(compile_runs), file=sys.stderr)
    best = min(compile_runs, key=lambda r: r["total_wall_s"])
    memory_after_compile = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        inc = asyncio.run(incremental(args.seed, args.samples, Path(tmp), args.churn))
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    report = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, load {load}",
        "full_compile_best_of_3": best,
        "full_compile_wall_s_all": [r["total_wall_s"] for r in compile_runs],
        "peak_rss_mb_after_compiles": round(memory_after_compile, 1),
        "incremental": inc,
        "peak_rss_mb_benchmark_process": round(peak_rss_mb(), 1),
    }
    print(json.dumps(report, indent=1))
    return 0
