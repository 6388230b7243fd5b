"""Events ingest benchmark: the service's ingest path, in process and with NATS in the loop.

    .venv/bin/python bench/events/run.py [--flows 200000] [--batch 256]
    .venv/bin/python bench/events/run.py --nats [--flows 300000] [--rate 20000] [--seconds 5]

Flows are enriched as the datapath sends them (labels, workloads, summary, interface),
published as the datapath's ``BatchPublisher`` envelope (``ciliate.flows.pack_envelope``:
``{"source", "items", "lost", "lt"}``, each distinct label list once per batch in ``lt``):
~290 bytes/flow; ~780 with the labels inline (the earlier envelope, ``--inline`` rows).

Without ``--nats``: flows/s of ``Stream.ingest_bytes`` (the service's ingest: one msgpack
decode per batch, chunk ring append, per-batch Hubble metrics, per-batch filtered fan-out)
for growing configurations, next to msgpack decoding alone (the floor of any design that
looks at every flow's fields) in the same run, and the same two for the inline envelope.

With ``--nats``: a nats-server and a publisher process sending pre-encoded batches as fast as
it can (so the producer's encoding is not what is measured) on ``flows.n1``; the consumer
subscribes with ``Bus.subscribe_raw`` as ``service.py`` does. Ingest flows/s for: decode only
(baseline: NATS + msgpack on this machine), the service's ingest with 2 Hubble metrics and 1
filtered follower, and with 10; then decode only and 1 follower again with inline labels.
Then the delivery latency (publish time, stamped into each flow's ``t``, to a follower task
holding the record) for 10 followers with their own filters at ``--rate`` flows/s offered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
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
    pack_envelope,
)
from ciliate.flows.model import Workload
from services.events.core.cliflags import filters_from_flags
from services.events.core.filters import FilterSet
from services.events.core.metrics import FlowMetrics
from services.events.core.query import FlowQuery
from services.events.observer import Stream, fill_node

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
"""Ten followers' filters, as ``hubble observe`` flags."""

SERVICE_METRICS = ["flows-processed", "drop"]
"""What the service enables by default (``CILIATE_HUBBLE_METRICS="flow drop"``)."""


def _labels(ns: str, app: str) -> list[str]:
    return [f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}",
            f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ns}",
            "k8s:io.cilium.k8s.policy.cluster=default",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
            f"k8s:pod-template-hash={app}5d4f8b", "k8s:version=v1.2.3"]


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
            interface=(12, "lxc5d4f8b2k9q"), summary="TCP Flags: SYN",
            source=Endpoint(id=100 + i % 50, identity=1234, namespace=ns_s,
                            pod_name=f"{app_s}-5d4f8b-x2k9q", labels=_labels(ns_s, app_s),
                            workloads=[Workload(app_s, "Deployment")]),
            destination=Endpoint(id=200 + i % 50, identity=5678, namespace=ns_d,
                                 pod_name=f"{app_d}-7c9d6f-p8m2z", labels=_labels(ns_d, app_d),
                                 workloads=[Workload(app_d, "Deployment")]),
        ))
    return out


def envelope(items: list[dict[str, Any]], inline: bool = False) -> bytes:
    """What the datapath's ``BatchPublisher`` sends (``inline``: the earlier envelope, labels
    in every flow)."""
    if not inline:
        return pack_envelope("n1", items, 0)
    data: bytes = msgpack.packb({"source": "n1", "items": items, "lost": 0}, use_bin_type=True)
    return data


def encoded_batches(flows: int, batch: int, inline: bool = False) -> list[bytes]:
    """Envelopes of ``batch`` flows; the flow objects are gone afterwards, so the collector
    does not walk a big test data set while ingest is measured."""
    wires = [f.to_wire() for f in make_flows(min(flows, 50_000))]
    out = [envelope([wires[(i + j) % len(wires)] for j in range(batch)], inline)
           for i in range(0, flows, batch)]
    del wires
    gc.collect()
    return out


def stream_with(metrics: list[str], followers: int) -> tuple[Stream, list[Any]]:
    """The service's flow stream (as ``service.Observer`` builds it) with N filtered followers."""
    try:
        stream = Stream("flows", 4095, 4096, fill_node, use_list=False, keep_raw=True)
    except TypeError:  # the ingest before batch rings: before/after runs from an old tree
        stream = Stream("flows", 4095, 4096, fill_node)
    if metrics:
        stream.hooks.append(FlowMetrics.from_config(metrics).observe_many)
    subs = []
    for flags in FOLLOWER_FLAGS[:followers]:
        white, black = filters_from_flags(flags)
        subs.append(stream.hub.add(FlowQuery(FilterSet(white, black)), 1 << 30))
    return stream, subs


CONFIGS: list[tuple[str, list[str], int]] = [
    ("ingest: decode + ring", [], 0),
    ("ingest + 2 Hubble metrics (flow, drop)", SERVICE_METRICS, 0),
    ("ingest + 4 Hubble metrics", ["flows-processed", "drop", "tcp", "port-distribution"], 0),
    ("ingest + 2 metrics + 1 filtered follower", SERVICE_METRICS, 1),
    ("ingest + 2 metrics + 10 filtered followers", SERVICE_METRICS, 10),
]


def in_process(args: argparse.Namespace) -> None:
    """Each configuration once per round, rounds repeated: load bursts from other processes
    hit every configuration alike; the best and the median round are reported."""
    batches = encoded_batches(args.flows, args.batch)
    inline = encoded_batches(args.flows, args.batch, inline=True)
    total = len(batches) * args.batch
    size = sum(len(b) for b in batches) / total
    inline_size = sum(len(b) for b in inline) / total
    print(f"{total:,} flows, {size:.0f} bytes/flow on the wire ({inline_size:.0f} with labels "
          f"inline), batches of {args.batch}")

    def decode_only(data: bytes) -> object:
        return msgpack.unpackb(data, use_list=False)

    runs: list[tuple[str, Callable[[bytes], object], list[Any], list[bytes]]] = [
        ("msgpack decode alone (baseline)", decode_only, [], batches)]
    for name, metrics, followers in CONFIGS:
        stream, subs = stream_with(metrics, followers)
        runs.append((name, partial(stream.ingest_bytes, "n1"), subs, batches))
    runs.append(("inline labels: msgpack decode alone", decode_only, [], inline))
    stream, subs = stream_with(*CONFIGS[3][1:])
    runs.append(("inline labels: ingest + 2 metrics + 1 follower",
                 partial(stream.ingest_bytes, "n1"), subs, inline))
    wall: dict[str, list[float]] = {name: [] for name, *_ in runs}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for _ in range(args.repeat):
        for name, ingest, subs, data in runs:
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            for b in data:
                ingest(b)
                for f in subs:  # followers keep up here; the cost measured is ingest's
                    f.drain()
            wall[name].append(total / (time.perf_counter() - start))
            cpu[name].append(total / (time.process_time() - cpu_start))
    print(f"{'':<44} {'flows/s wall':>14} {'flows/CPU-s':>12} "
          f"(best; median of {args.repeat})")
    for name, *_ in runs:
        print(f"{name:<44} {max(wall[name]):>14,.0f} {max(cpu[name]):>12,.0f} "
              f"({statistics.median(wall[name]):,.0f}; {statistics.median(cpu[name]):,.0f})")


ACK_SUBJECT = "bench.events.ack"
WINDOW = 32
"""Messages the full-speed publisher may have in flight beyond the consumer's last ack: enough
to keep the consumer busy, few enough that nats-server never cuts it off as a slow consumer."""


async def publish(url: str, flows: int, batch: int, rate: float, inline: bool) -> None:
    """The publisher process: pre-encoded envelopes as fast as the consumer acks, or stamped
    with the current time at a fixed rate."""
    import nats

    nc = await nats.connect(url)
    wires = [f.to_wire() for f in make_flows(min(flows, 20_000))]
    sent, start = 0, time.perf_counter()
    if not rate:
        acked = [0]
        more = asyncio.Event()

        async def on_ack(msg: Any) -> None:
            acked[0] = int(msg.data)
            more.set()

        await nc.subscribe(ACK_SUBJECT, cb=on_ack)
        await nc.flush()
        packed = [envelope(wires[i:i + batch], inline)
                  for i in range(0, len(wires) - batch + 1, batch)]
        i = 0
        while sent < flows:
            while i - acked[0] >= WINDOW:
                more.clear()
                await nc.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(more.wait(), 5)
            await nc.publish("flows.n1", packed[i % len(packed)])
            sent += batch
            i += 1
    while rate and sent < flows:
        delay = start + sent / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.time_ns()
        items = [{**wires[(sent + i) % len(wires)], "t": now} for i in range(batch)]
        await nc.publish("flows.n1", envelope(items, inline))
        sent += batch
    await nc.flush()
    await nc.close()


def _spawn_publisher(url: str, flows: int, batch: int, rate: float,
                     inline: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--publish", url, "--flows", str(flows),
                             "--batch", str(batch), "--rate", str(rate)]
                            + (["--inline"] if inline else []))


async def _ingest_run(bus: Any, url: str, name: str, args: argparse.Namespace,
                      consume: Callable[[bytes], int], inline: bool = False) -> None:
    """Publisher at full speed; flows/s from the first to the last message consumed."""
    total = args.flows - args.flows % args.batch
    got = [0, 0]
    first_at: list[float] = []
    last_at = [0.0]
    cpu = [0.0, 0.0]
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        if not first_at:
            first_at.append(time.perf_counter())
            cpu[0] = time.process_time()
        got[0] += consume(msg.data)
        got[1] += 1
        last_at[0] = time.perf_counter()
        cpu[1] = time.process_time()
        if got[1] % 8 == 0:
            await bus.nc.publish(ACK_SUBJECT, str(got[1]).encode())
        if got[0] >= total:
            done.set()

    sub = await bus.subscribe_raw("flows.*", on_msg)
    await bus.nc.flush()
    gc.collect()
    pub = _spawn_publisher(url, total, args.batch, 0, inline)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 120)
    pub.wait(30)
    await sub.unsubscribe()
    elapsed = last_at[0] - first_at[0] if first_at else float("nan")
    print(f"NATS {name:<44} {got[0] / elapsed:>10,.0f} flows/s wall "
          f"{got[0] / (cpu[1] - cpu[0]):>10,.0f} flows/CPU-s "
          f"({got[0]:,} of {total:,} flows in {elapsed:.2f}s)")


async def nats_bench(args: argparse.Namespace) -> None:
    from ciliate.bus import Bus
    from ciliate.stack.nats import NatsServer

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        try:
            bus = await Bus.connect(server.url, name="bench-events")

            def decode_only(data: bytes) -> int:
                return len(msgpack.unpackb(data, use_list=False)["items"])

            if not args.latency_only:
                await _ingest_run(bus, server.url, "msgpack decode alone (baseline)", args,
                                  decode_only)
            for name, metrics, followers in () if args.latency_only else (CONFIGS[3],
                                                                          CONFIGS[4]):
                stream, subs = stream_with(metrics, followers)

                def ingest(data: bytes, stream: Stream = stream, subs: list[Any] = subs) -> int:
                    n = stream.ingest_bytes("n1", data)
                    for f in subs:
                        f.drain()
                    return n

                await _ingest_run(bus, server.url, name, args, ingest)
            if not args.latency_only:
                await _ingest_run(bus, server.url, "inline labels: msgpack decode alone", args,
                                  decode_only, inline=True)
                stream, subs = stream_with(*CONFIGS[3][1:])

                def ingest_inline(data: bytes, stream: Stream = stream,
                                  subs: list[Any] = subs) -> int:
                    n = stream.ingest_bytes("n1", data)
                    for f in subs:
                        f.drain()
                    return n

                await _ingest_run(bus, server.url, "inline labels: ingest + 2 metrics + 1 follower",
                                  args, ingest_inline, inline=True)

            stream, _ = stream_with(SERVICE_METRICS, 0)
            latencies: list[int] = []
            total = int(args.rate * args.seconds)
            total -= total % args.latency_batch

            async def follow(flags: list[tuple[str, str]]) -> None:
                w_, b_ = filters_from_flags(flags)
                f = stream.hub.add(FlowQuery(FilterSet(w_, b_)))
                while True:  # after close, get() still hands out what was queued
                    records = await f.get()
                    if not records and f.closed:
                        return
                    now = time.time_ns()
                    latencies.extend(now - w["t"] for w in records if "u" in w)

            tasks = [asyncio.create_task(follow(flags)) for flags in FOLLOWER_FLAGS[:10]]
            done = asyncio.Event()

            async def on_msg(msg: Any) -> None:
                stream.ingest_bytes(msg.subject.partition(".")[2], msg.data)
                if stream.received_total >= total:
                    done.set()

            await bus.subscribe_raw("flows.*", on_msg)
            await bus.nc.flush()
            pub = _spawn_publisher(server.url, total, args.latency_batch, args.rate)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), args.seconds * 3 + 30)
            pub.wait(30)
            for f in stream.hub.followers():
                stream.hub.remove(f)
            await asyncio.gather(*tasks)
            latencies.sort()
            ms = [v / 1e6 for v in latencies]
            print(f"delivery to 10 filtered followers at {args.rate:,.0f} flows/s offered "
                  f"({stream.received_total:,} flows, {len(ms):,} deliveries, batches of "
                  f"{args.latency_batch}): p50 {statistics.median(ms):.2f} ms, "
                  f"p99 {ms[int(len(ms) * 0.99)]:.2f} ms, max {ms[-1]:.2f} ms")
            await bus.close()
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="in-process rounds")
    ap.add_argument("--nats", action="store_true", help="NATS in the loop (see the docstring)")
    ap.add_argument("--rate", type=float, default=20_000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--latency-batch", type=int, default=100,
                    help="flows per message in the latency run (20 ms of BatchPublisher "
                         "max_delay at 5,000 flows/s per node)")
    ap.add_argument("--latency-only", action="store_true", help="with --nats: skip ingest runs")
    ap.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publish:
        asyncio.run(publish(args.publish, args.flows, args.batch, args.rate, args.inline))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, msgpack {msgpack.version}")
    if args.nats:
        asyncio.run(nats_bench(args))
    else:
        in_process(args)


if __name__ == "__main__":
    main()
