"""Events ingest benchmark: decode msgpack batches, append to the node ring, offer to followers.

    .venv/bin/python bench/events/run.py [--flows 200000] [--batch 256] [--followers 10]
    .venv/bin/python bench/events/run.py --nats [--flows 150000] [--rate 20000] [--seconds 5]

Without ``--nats``: flows/s for decode+append; +metrics; +fan-out to N filtered followers.
With ``--nats``: a nats-server and a publisher process (BatchPublisher envelopes on
``flows.n1``); the service's ingest (``services.events.observer.Stream``: decode, ring, Hubble
metrics, hub) subscribed with ``Bus.subscribe_raw`` as the service is. It reports ingest flows/s
with the publisher sending as fast as it can, then the delivery latency (publish time to a
follower task holding the record) for 10 followers with their own filters at ``--rate``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from ciliate.flows import (
    Endpoint,
    Flow,
    MessageType,
    TCPFlag,
    TrafficDirection,
    Verdict,
    decode_batch,
    encode_batch,
)
from services.events.core.cliflags import filters_from_flags
from services.events.core.fanout import Hub
from services.events.core.filters import FilterSet
from services.events.core.metrics import FlowMetrics
from services.events.core.query import FlowQuery
from services.events.core.ring import Ring

FOLLOWER_FLAGS: list[list[tuple[str, str]]] = [
    [("verdict", "DROPPED")],
    [("pod", "x/a")],
    [("from-namespace", "y"), ("to-port", "80")],
    [("type", "policy-verdict")],
    [("not", ""), ("verdict", "FORWARDED")],
    [("label", "app=b")],
    [("protocol", "udp")],
    [("ip", "10.0.1.5")],
    [("identity", "1234"), ("verdict", "DROPPED")],
    [("node-name", "n1"), ("tcp-flags", "SYN")],
]


def make_flows(n: int) -> list[Flow]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        ns_s, ns_d = rng.choice("xyz"), rng.choice("xyz")
        app_s, app_d = rng.choice("abc"), rng.choice("abc")
        drop = rng.random() < 0.1
        out.append(Flow(
            time_ns=1_700_000_000_000_000_000 + i * 1000, uuid=f"{i:032x}", node_name="n1",
            verdict=Verdict.DROPPED if drop else Verdict.FORWARDED,
            drop_reason=133 if drop else 0,
            event_type=MessageType.POLICY_VERDICT if drop else MessageType.TRACE,
            event_sub_type=133 if drop else 0, traffic_direction=TrafficDirection.INGRESS,
            is_reply=rng.random() < 0.5, ip_version=1,
            source_ip=f"10.0.{rng.randrange(4)}.{rng.randrange(250)}",
            destination_ip=f"10.0.{rng.randrange(4)}.{rng.randrange(250)}",
            protocol=rng.choice((6, 6, 6, 17)), source_port=rng.randrange(30000, 60000),
            destination_port=rng.choice((80, 81, 443, 53)), tcp_flags=TCPFlag.SYN,
            source=Endpoint(id=100 + i % 50, identity=1234, namespace=ns_s,
                            pod_name=f"{app_s}-5d4f8b-x2k9q",
                            labels=[f"k8s:app={app_s}", f"k8s:io.kubernetes.pod.namespace={ns_s}",
                                    "k8s:io.cilium.k8s.policy.serviceaccount=default"]),
            destination=Endpoint(id=200 + i % 50, identity=5678, namespace=ns_d,
                                 pod_name=f"{app_d}-7c9d6f-p8m2z",
                                 labels=[f"k8s:app={app_d}",
                                         f"k8s:io.kubernetes.pod.namespace={ns_d}"]),
        ))
    return out


def measure(name: str, batches: list[bytes], total: int,
            sink: Callable[[list[dict[str, object]]], None]) -> float:
    start = time.perf_counter()
    for b in batches:
        sink(decode_batch(b))
    elapsed = time.perf_counter() - start
    rate = total / elapsed
    print(f"{name:<48} {rate:>12,.0f} flows/s")
    return rate


async def publish(url: str, flows: int, batch: int, rate: float) -> None:
    """The publisher process: BatchPublisher envelopes, as fast as possible or paced at rate."""
    import nats

    nc = await nats.connect(url)
    wires = [f.to_wire() for f in make_flows(min(flows, 20_000))]
    sent, start = 0, time.perf_counter()
    while sent < flows:
        items = [wires[(sent + i) % len(wires)] for i in range(min(batch, flows - sent))]
        if rate:
            due = start + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time_ns()
            items = [{**w, "t": now} for w in items]
        await nc.publish("flows.n1", msgpack.packb({"source": "bench", "items": items,
                                                    "lost": 0}))
        sent += len(items)
    await nc.flush()
    await nc.close()


def _spawn_publisher(url: str, flows: int, batch: int, rate: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--publish", url, "--flows", str(flows),
                             "--batch", str(batch), "--rate", str(rate)])


async def nats_bench(args: argparse.Namespace) -> None:
    from ciliate.bus import Bus
    from ciliate.stack.nats import NatsServer
    from services.events.core.metrics import FlowMetrics
    from services.events.observer import Stream, fill_node

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        try:
            bus = await Bus.connect(server.url, name="bench-events")
            stream = Stream("flows", 4095, 4096, fill_node)
            metrics = FlowMetrics.from_config(["flows-processed", "drop"])
            stream.hooks.append(metrics.observe_many)
            white, black = filters_from_flags(FOLLOWER_FLAGS[0])
            one = stream.hub.add(FlowQuery(FilterSet(white, black)), 1 << 30)
            first_at: list[float] = []
            done = asyncio.Event()

            async def on_msg(msg: Any) -> None:
                if not first_at:
                    first_at.append(time.perf_counter())
                stream.ingest_bytes(msg.subject.partition(".")[2], msg.data)
                one.drain()
                if stream.received_total >= args.flows:
                    done.set()

            sub = await bus.subscribe_raw("flows.*", on_msg)
            await bus.nc.flush()
            pub = _spawn_publisher(server.url, args.flows, args.batch, 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 120)
            elapsed = time.perf_counter() - first_at[0] if first_at else float("nan")
            pub.wait(30)
            print(f"NATS ingest (decode + ring + 2 Hubble metrics + 1 filtered follower): "
                  f"{stream.received_total:,} flows in {elapsed:.2f}s = "
                  f"{stream.received_total / elapsed:,.0f} flows/s")
            await sub.unsubscribe()
            stream.hub.remove(one)

            stream2 = Stream("flows", 4095, 4096, fill_node)
            stream2.hooks.append(FlowMetrics.from_config(["flows-processed", "drop"]).observe_many)
            latencies: list[int] = []
            total = int(args.rate * args.seconds)

            async def follow(flags: list[tuple[str, str]]) -> None:
                w_, b_ = filters_from_flags(flags)
                f = stream2.hub.add(FlowQuery(FilterSet(w_, b_)))
                while not f.closed:
                    records = await f.get()
                    now = time.time_ns()
                    latencies.extend(now - w["t"] for w in records if "u" in w)

            tasks = [asyncio.create_task(follow(flags)) for flags in FOLLOWER_FLAGS[:10]]

            done2 = asyncio.Event()

            async def on_msg2(msg: Any) -> None:
                stream2.ingest_bytes(msg.subject.partition(".")[2], msg.data)
                if stream2.received_total >= total:
                    done2.set()

            await bus.subscribe_raw("flows.*", on_msg2)
            await bus.nc.flush()
            pub = _spawn_publisher(server.url, total, args.latency_batch, args.rate)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done2.wait(), args.seconds * 3 + 30)
            pub.wait(30)
            await asyncio.sleep(0.2)  # let the followers take the last batch before reading
            for f in stream2.hub.followers():
                stream2.hub.remove(f)
            await asyncio.gather(*tasks)
            latencies.sort()
            ms = [v / 1e6 for v in latencies]
            print(f"delivery to 10 filtered followers at {args.rate:,.0f} flows/s offered "
                  f"({stream2.received_total:,} flows, {len(ms):,} deliveries, batches of "
                  f"{args.latency_batch}): p50 {statistics.median(ms):.2f} ms, "
                  f"p99 {ms[int(len(ms) * 0.99)]:.2f} ms, max {ms[-1]:.2f} ms")
            await bus.close()
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--followers", type=int, default=10)
    ap.add_argument("--nats", action="store_true", help="NATS in the loop (see the docstring)")
    ap.add_argument("--rate", type=float, default=20_000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--latency-batch", type=int, default=100,
                    help="flows per message in the latency run (20 ms of BatchPublisher "
                         "max_delay at 5,000 flows/s per node)")
    ap.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish:
        asyncio.run(publish(args.publish, args.flows, args.batch, args.rate))
        return
    if args.nats:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        asyncio.run(nats_bench(args))
        return

    flows = make_flows(args.flows)
    batches = [encode_batch(flows[i:i + args.batch]) for i in range(0, len(flows), args.batch)]
    size = sum(len(b) for b in batches) / len(flows)
    print(f"{len(flows)} flows, {size:.0f} bytes/flow on the wire, batches of {args.batch}")

    ring = Ring()
    measure("decode + ring append", batches, len(flows), ring.extend)

    metrics = FlowMetrics.from_config(["flows-processed", "drop", "tcp", "port-distribution"])

    def with_metrics(records: list[dict[str, object]]) -> None:
        ring.extend(records)
        metrics.observe_many(records)

    measure("decode + ring append + 4 Hubble metrics", batches, len(flows), with_metrics)

    hub = Hub(default_queue=1 << 30)
    for flags in FOLLOWER_FLAGS[: args.followers]:
        white, black = filters_from_flags(flags)
        hub.add(FlowQuery(FilterSet(white, black)))

    def with_fanout(records: list[dict[str, object]]) -> None:
        ring.extend(records)
        hub.publish(records)
        for f in hub.followers():  # followers keep up here; the cost measured is ingest's
            f.drain()

    measure(f"decode + ring append + {len(hub)} filtered followers", batches, len(flows),
            with_fanout)
    hub1 = Hub(default_queue=1 << 30)
    white, black = filters_from_flags(FOLLOWER_FLAGS[0])
    hub1.add(FlowQuery(FilterSet(white, black)))

    def with_one(records: list[dict[str, object]]) -> None:
        ring.extend(records)
        hub1.publish(records)
        for f in hub1.followers():
            f.drain()

    measure("decode + ring append + 1 filtered follower", batches, len(flows), with_one)


if __name__ == "__main__":
    main()
