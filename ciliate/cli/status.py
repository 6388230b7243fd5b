"""``ciliate status``: every service replica and node from the heartbeats, health, features."""

from __future__ import annotations

import time
from typing import Any

import click

from ciliate.bus import Bucket
from ciliate.bus.subjects import SERVICES
from ciliate.cli.output import echo_json, fail, run
from ciliate.client import ClientContext, ContextMissing, connect_bus

STALE_AFTER = 10.0
"""A heartbeat older than this (seconds) marks its replica unhealthy."""


def problems(beat: dict[str, Any], checks: dict[str, Any], age: float) -> list[str]:
    """Why a replica is degraded, in words: each failing readiness check, a stale heartbeat."""
    found = [f"{name} check failing" for name, ok in sorted(checks.items()) if not ok]
    if not beat.get("ready") and not found:
        found.append("not ready")
    if age >= STALE_AFTER:
        found.append(f"no heartbeat for {age:.0f}s")
    return found


async def collect(context: ClientContext) -> dict[str, Any]:
    bus = await connect_bus(context)
    try:
        beats = await (await bus.kv(Bucket.HEARTBEATS)).items()
    finally:
        await bus.close()
    now = time.time()
    services: dict[str, dict[str, Any]] = {}
    expected = [s for s in SERVICES if s in context.services]
    for name in expected:
        services[name] = {"healthy": False, "replicas": []}
    for beat in beats.values():
        if not isinstance(beat, dict):
            continue
        name = str(beat.get("service", "?"))
        age = now - float(beat.get("at", 0))
        healthy = bool(beat.get("ready")) and age < STALE_AFTER
        raw_checks = beat.get("checks")
        checks: dict[str, Any] = raw_checks if isinstance(raw_checks, dict) else {}
        entry = services.setdefault(name, {"healthy": False, "replicas": []})
        entry["replicas"].append({
            "replica": beat.get("replica"), "node": beat.get("node"), "pid": beat.get("pid"),
            "url": beat.get("url"), "healthy": healthy, "age_seconds": round(age, 1),
            "checks": checks, "problems": problems(beat, checks, age),
            "status": beat.get("status", {}),
        })
    for entry in services.values():
        entry["replicas"].sort(key=lambda r: str(r["replica"]))
        entry["healthy"] = bool(entry["replicas"]) and all(r["healthy"] for r in entry["replicas"])
    nodes = sorted({str(r["node"]) for e in services.values() for r in e["replicas"]}
                   | set(context.nodes))
    return {
        "healthy": all(e["healthy"] for e in services.values()) and bool(services),
        "services": services,
        "nodes": nodes,
        "nats": context.nats_url,
        "state_dir": context.state_dir,
    }


@click.command("status")
@click.option("--verbose", is_flag=True, help="Per-replica details and kernel features.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def status(verbose: bool, output: str) -> None:
    """Every service and node, health, kernel features, counts."""
    try:
        context = ClientContext.load()
    except ContextMissing as exc:
        fail(str(exc))
        return
    try:
        report = run(collect(context))
    except Exception as exc:
        fail(f"cannot reach the stack's NATS at {context.nats_url}: {exc}")
        return
    if verbose:
        from ciliate.doctor.probes import kernel_features

        report["kernel"] = kernel_features().to_dict()
    if output == "json":
        echo_json(report)
    else:
        click.echo(f"Stack:      {'Ok' if report['healthy'] else 'Degraded'}   "
                   f"({report['state_dir']})")
        click.echo(f"NATS:       {report['nats']}")
        click.echo(f"Nodes:      {', '.join(report['nodes'])}")
        for name, entry in report["services"].items():
            reps = entry["replicas"]
            up = sum(1 for r in reps if r["healthy"])
            click.echo(f"{name + ':':<11} {'Ok' if entry['healthy'] else 'Degraded':<9} "
                       f"{up}/{len(reps)} replicas healthy")
            if not reps:
                click.echo("    no replica is sending heartbeats")
            for r in reps:
                if r["problems"] and not verbose:
                    click.echo(f"    {r['replica']}: {', '.join(r['problems'])}")
            if verbose:
                for r in reps:
                    click.echo(f"    {r['replica']:<8} node={r['node']} pid={r['pid']} "
                               f"{r['url']} {'ok' if r['healthy'] else 'unhealthy'} "
                               f"(heartbeat {r['age_seconds']}s ago)"
                               + (f": {', '.join(r['problems'])}" if r["problems"] else ""))
                    for key, value in (r.get("status") or {}).items():
                        click.echo(f"        {key}: {value}")
        if verbose and "kernel" in report:
            click.echo("Kernel features:")
            for key, value in report["kernel"].items():
                click.echo(f"    {key}: {value}")
    if not report["healthy"]:
        raise SystemExit(1)
