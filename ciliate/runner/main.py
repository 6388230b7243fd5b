"""The process lifecycle shared by every service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from ciliate.api import READINESS_KEY, STATUS_KEY, make_app
from ciliate.bus import Bucket, Bus
from ciliate.config import Settings
from ciliate.logs import setup_logging
from ciliate.runner.context import ServiceContext, ServiceSpec
from ciliate.store import Database

HEARTBEAT_INTERVAL = 2.0


def parse_args(spec: ServiceSpec, argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog=f"ciliate run {spec.name}")
    parser.add_argument("--nats-url")
    parser.add_argument("--db-url")
    parser.add_argument("--token")
    parser.add_argument("--node")
    parser.add_argument("--state-dir")
    parser.add_argument("--http-host")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--replica")
    parser.add_argument("--log-format", choices=["text", "json"])
    parser.add_argument("--dev-mode", action="store_true", default=None)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    return settings.with_overrides(
        nats_url=args.nats_url,
        db_url=args.db_url,
        token=args.token,
        node=args.node,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        http_host=args.http_host,
        http_port=args.http_port,
        replica=args.replica,
        log_format=args.log_format,
        dev_mode=args.dev_mode,
    )


async def _heartbeat(ctx: ServiceContext, url: str, started: float) -> None:
    kv = await ctx.bus.kv(Bucket.HEARTBEATS)
    key = f"{ctx.spec.name}.{ctx.replica}"
    while True:
        try:
            checks = {name: bool(await check())
                      for name, check in ctx.app[READINESS_KEY].items()}
            await kv.put(key, {
                "service": ctx.spec.name,
                "replica": ctx.replica,
                "node": ctx.settings.node,
                "pid": os.getpid(),
                "url": url,
                "started": started,
                "at": time.time(),
                "ready": all(checks.values()),
                "checks": checks,
                "status": ctx.status,
            })
        except Exception as exc:  # NATS away: keep trying, the bus reconnects by itself
            ctx.log.debug("heartbeat not sent: %s", exc)
        await asyncio.sleep(HEARTBEAT_INTERVAL)


async def run_service(spec: ServiceSpec, settings: Settings,
                      stop: asyncio.Event | None = None) -> None:
    log = logging.getLogger(f"ciliate.{spec.name}")
    replica = settings.replica or uuid.uuid4().hex[:8]
    stop = stop or asyncio.Event()
    bus = await Bus.connect(settings.nats_url, name=f"{spec.name}-{replica}",
                            user=settings.nats_user, password=settings.nats_password)
    db = Database(settings.db_url) if spec.uses_db else None
    app = make_app(spec.name, token=settings.token)
    ctx = ServiceContext(spec, settings, bus, app, db, log, replica)

    async def nats_ready() -> bool:
        return bus.connected

    app[READINESS_KEY]["nats"] = nats_ready
    if db is not None:
        app[READINESS_KEY]["database"] = db.ping

    def status() -> dict[str, Any]:
        return {"service": spec.name, "replica": replica, "node": settings.node,
                "nats": bus.connected, **ctx.status}

    app[STATUS_KEY] = status
    await spec.setup(ctx)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    port = settings.http_port
    for sock in runner.addresses:
        port = int(sock[1])
        break
    url = f"http://{settings.http_host}:{port}"
    log.info("%s replica %s serving on %s (node %s)", spec.name, replica, url, settings.node)
    ctx.spawn(_heartbeat(ctx, url, time.time()), name="heartbeat")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s replica %s stopping", spec.name, replica)
    with contextlib.suppress(Exception):
        kv = await asyncio.wait_for(bus.kv(Bucket.HEARTBEATS), 1)
        await asyncio.wait_for(kv.delete(f"{spec.name}.{replica}"), 1)
    await runner.cleanup()
    for callback in reversed(ctx._shutdown):
        try:
            await callback()
        except Exception:
            log.exception("shutdown callback failed")
    for task in ctx._tasks:
        task.cancel()
    await asyncio.gather(*ctx._tasks, return_exceptions=True)
    await bus.close()
    if db is not None:
        await db.close()


def main(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    settings = parse_args(spec, argv)
    setup_logging(spec.name, settings.log_format, settings.log_level)
    asyncio.run(run_service(spec, settings))
