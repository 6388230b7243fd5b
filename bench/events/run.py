"""Events ingest benchmark: decode msgpack batches, append to the node ring, offer to followers.

    .venv/bin/python bench/events/run.py [--flows 200000] [--batch 256] [--followers 10]

Prints flows/s for: decode+append; decode+append+metrics; decode+append+fan-out to N
followers each with its own filter (the service's ingest path).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--followers", type=int, default=10)
    args = ap.parse_args()

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
