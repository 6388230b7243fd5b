"""Wires the observer to NATS (flows.*, process.*), REST/SSE/websocket, metrics, export, UI.

Everything runs on one event loop: a NATS callback ingests a whole batch synchronously (ring
append, hub offer, metrics), so a follower registered by a request handler sees every record
after its history snapshot exactly once. Followers read from their own bounded queues; a slow
reader loses records (reported to it as a LostEvent), never slows ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from nats.aio.msg import Msg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ciliate.api import REGISTRY_KEY, field_problem, route
from ciliate.bus.subjects import FLOWS_ALL, PROCESS_ALL
from ciliate.flows.jsonpb import get_flows_response
from ciliate.flows.model import Wire
from ciliate.runner import ServiceContext, ServiceSpec
from services.events.core import process as proc
from services.events.core.config import EventsConfig, from_env
from services.events.core.exporter import ExporterCore
from services.events.core.fanout import Follower
from services.events.core.metrics import FlowMetrics
from services.events.core.request import (
    FLOW_PARAMS,
    Params,
    RequestError,
    StreamRequest,
    parse_common,
    parse_flow_request,
    predicate_filters,
)
from services.events.core.servicemap import build as build_service_map
from services.events.export_file import RotatingFile
from services.events.observer import Stream, fill_node

UI_DIR = Path(__file__).parent / "ui"
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
KEEPALIVE_SECONDS = 15.0
OTLP_SHUTDOWN_SECONDS = 3.0
"""At stop, how long queued OTLP records may take to flush before they are given up."""
READ_LIMIT = 1000
"""Records taken from a follower's queue per write: one socket write carries a batch."""

Render = Callable[[Wire], dict[str, Any]]


class Observer:
    """The service's state: both streams, metrics, and the exporter (if configured)."""

    def __init__(self, config: EventsConfig) -> None:
        self.config = config
        self.started = time.time_ns()
        self.flows = Stream("flows", config.ring_size, config.follower_queue, fill_node,
                            use_list=False, keep_raw=True)
        self.processes = Stream("process", config.ring_size, config.follower_queue,
                                _prepare_process)
        self.metrics = FlowMetrics(list(config.metrics))
        self.otlp_status: Callable[[], dict[str, Any]] | None = None
        if config.metrics:
            self.flows.hooks.append(self.metrics.observe_many)

    def close_followers(self) -> None:
        for stream in (self.flows, self.processes):
            for f in stream.hub.followers():
                stream.hub.remove(f)


def _prepare_process(records: list[Wire], node: str) -> None:
    now = time.time_ns()
    for event in records:
        proc.stamp(event, now)
        event.setdefault("node_name", node)


class HubbleCollector(Collector):
    """Hubble's metrics, read from the pure counters at scrape time."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for spec, labels, values in self.observer.metrics.samples():
            family = CounterMetricFamily(spec.name.removesuffix("_total"), spec.help,
                                         labels=list(labels))
            for key, count in sorted(values.items()):
                family.add_metric(list(key), count)
            yield family
        flows = self.observer.flows
        seen = CounterMetricFamily("hubble_flows_seen", "Flows received from all nodes",
                                   labels=["node"])
        held = GaugeMetricFamily("hubble_ring_flows", "Flows held in each node's ring",
                                 labels=["node"])
        for node, ring in sorted(flows.rings.items()):
            seen.add_metric([node], ring.written)
            held.add_metric([node], len(ring))
        yield seen
        yield held
        drops = CounterMetricFamily("ciliate_events_follower_drops",
                                    "Records dropped for slow followers", labels=["stream"])
        for stream in (flows, self.observer.processes):
            drops.add_metric([stream.kind], sum(f.dropped_total for f in stream.hub.followers()))
        yield drops


def _params(request: web.Request) -> Params:
    return {k: request.query.getall(k) for k in request.query}


def _bad(exc: RequestError) -> web.HTTPException:
    return field_problem(400, exc.field, exc.message)


def _flow_render(encoding: str) -> Render:
    return (lambda w: w) if encoding == "wire" else get_flows_response


def _process_render(_: str) -> Render:
    return proc.public


def _process_request(params: Params, now_ns: int) -> StreamRequest:
    match = proc.make_predicate(params.get("namespace", ()), params.get("pod", ()),
                                params.get("process", ()), params.get("event_type", ()),
                                params.get("policy_name", ()))
    return parse_common(params, now_ns, predicate_filters(match))


async def _sse(request: web.Request, past: list[Wire], follower: Follower, stream: Stream,
               render: Render) -> web.StreamResponse:
    """One ``data:`` line per record (its JSON); a comment line keeps idle streams alive."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)

        def chunk(records: list[Wire]) -> bytes:
            return "".join(f"data: {json.dumps(render(w), separators=(',', ':'))}\n\n"
                           for w in records).encode()

        await resp.write(b": stream open\n\n" + chunk(past))
        while not follower.closed:
            try:
                batch = await asyncio.wait_for(follower.get(READ_LIMIT), KEEPALIVE_SECONDS)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            if batch:
                await resp.write(chunk(batch))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        stream.hub.remove(follower)
    return resp


async def _ws(request: web.Request, stream: Stream, parse: Callable[[Params, int], StreamRequest],
              render_for: Callable[[str], Render]) -> web.StreamResponse:
    """Websocket follow: each text message is one record's JSON; closing ends the follower."""
    try:
        req = parse(_params(request), time.time_ns())
    except RequestError as exc:
        raise _bad(exc) from None
    ws = web.WebSocketResponse(heartbeat=KEEPALIVE_SECONDS)
    await ws.prepare(request)
    past, follower = stream.follow(req.query)
    render = render_for(req.encoding)

    async def reader() -> None:
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
        follower.close()

    reading = asyncio.create_task(reader())
    try:
        for w in past:
            await ws.send_str(json.dumps(render(w), separators=(",", ":")))
        while not follower.closed and not ws.closed:
            for w in await follower.get(READ_LIMIT):
                await ws.send_str(json.dumps(render(w), separators=(",", ":")))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        stream.hub.remove(follower)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading
        await ws.close()
    return ws


def _stream_handler(stream: Stream, parse: Callable[[Params, int], StreamRequest],
                    render_for: Callable[[str], Render], key: str
                    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            req = parse(_params(request), time.time_ns())
        except RequestError as exc:
            raise _bad(exc) from None
        render = render_for(req.encoding)
        wants_sse = "text/event-stream" in request.headers.get("Accept", "")
        if req.follow or wants_sse:
            past, follower = stream.follow(req.query)
            return await _sse(request, past, follower, stream, render)
        records = stream.query(req.query)
        return web.json_response({key: [render(w) for w in records]})

    return handler


async def _start_export(ctx: ServiceContext, observer: Observer) -> None:
    cfg = observer.config
    if not cfg.export_path:
        return
    out = RotatingFile(cfg.export_path, cfg.export_max_bytes, cfg.export_backups)
    core = ExporterCore(cfg.export)
    follower = observer.flows.hub.add(maxlen=max(cfg.follower_queue, 65536))
    ctx.status["export"] = {"path": cfg.export_path}

    async def run() -> None:
        try:
            while not follower.closed:
                for w in await follower.get(READ_LIMIT):
                    line = core.render_line(w)
                    if line is not None:
                        out.write(line)
                out.flush()
                ctx.status["export"].update(exported=core.exported, skipped=core.skipped,
                                            dropped=follower.dropped_total)
        finally:
            out.close()

    ctx.spawn(run(), name="export")


async def _start_otlp(ctx: ServiceContext, observer: Observer) -> None:
    """OTLP log export (off unless ``CILIATE_EVENTS_OTLP_ENDPOINT`` is set). The SDK and its
    HTTP client are imported only then."""
    cfg = observer.config
    if not cfg.otlp.endpoint:
        return
    from services.events.export_otlp import OtlpExporter

    exporter = OtlpExporter(cfg.otlp)
    follower = observer.flows.hub.add(maxlen=max(cfg.follower_queue, 65536))

    def stats() -> dict[str, Any]:
        return {**exporter.stats(), "dropped": follower.dropped_total}

    def status() -> None:
        ctx.status["otlp"] = stats()

    observer.otlp_status = stats

    async def run() -> None:
        while not follower.closed:
            exporter.emit(await follower.get(READ_LIMIT))
            status()

    async def refresh() -> None:  # export results arrive from the SDK's thread
        while True:
            await asyncio.sleep(1.0)
            status()

    async def shutdown() -> None:
        observer.flows.hub.remove(follower)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def stop() -> None:  # a daemon thread: a collector that hangs cannot hold the exit
            try:
                exporter.shutdown(OTLP_SHUTDOWN_SECONDS)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(finish)

        threading.Thread(target=stop, name="otlp-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, OTLP_SHUTDOWN_SECONDS + 1)
        status()

    ctx.spawn(run(), name="otlp-export")
    ctx.spawn(refresh(), name="otlp-status")
    ctx.on_shutdown(shutdown)


def _add_ui(app: web.Application) -> None:
    """Static files, served open: a browser fetches them before it can hold the token, and they
    contain no data; every API call the page makes carries the bearer header."""

    async def index(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def page(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        if name not in UI_FILES:
            raise field_problem(404, "path", f"no UI file {name!r}")
        return web.Response(body=(UI_DIR / name).read_bytes(), content_type=UI_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    route(app, "GET", "/ui", index, summary="web UI (redirect)", open=True)
    route(app, "GET", "/ui/", page, summary="web UI page", open=True)
    route(app, "GET", "/ui/{name}", page, summary="web UI static file", open=True)


async def setup(ctx: ServiceContext) -> None:
    config = from_env(os.environ)
    observer = Observer(config)
    app = ctx.app
    app[OBSERVER_KEY] = observer
    app[REGISTRY_KEY].register(HubbleCollector(observer))

    async def on_flows(msg: Msg) -> None:
        observer.flows.ingest_bytes(msg.subject.partition(".")[2], msg.data)

    async def on_process(msg: Msg) -> None:
        observer.processes.ingest_bytes(msg.subject.partition(".")[2], msg.data)

    await ctx.bus.subscribe_raw(FLOWS_ALL, on_flows)
    await ctx.bus.subscribe_raw(PROCESS_ALL, on_process)

    flows_handler = _stream_handler(observer.flows, parse_flow_request, _flow_render, "flows")
    events_handler = _stream_handler(observer.processes, _process_request, _process_render,
                                     "events")

    async def flows_ws(request: web.Request) -> web.StreamResponse:
        return await _ws(request, observer.flows, parse_flow_request, _flow_render)

    async def events_ws(request: web.Request) -> web.StreamResponse:
        return await _ws(request, observer.processes, _process_request, _process_render)

    async def service_map(request: web.Request) -> web.StreamResponse:
        params = _params(request)
        try:
            req = parse_flow_request(params, time.time_ns())
        except RequestError as exc:
            raise _bad(exc) from None
        return web.json_response(build_service_map(observer.flows.query(req.query)))

    async def observer_status(_: web.Request) -> web.StreamResponse:
        flows = observer.flows
        return web.json_response({
            "num_flows": sum(len(r) for r in flows.rings.values()),
            "max_flows": config.ring_size * max(1, len(flows.rings)),
            "seen_flows": flows.received_total,
            "uptime_ns": time.time_ns() - observer.started,
            "num_connected_nodes": len(flows.rings),
            "flows": flows.stats(),
            "process": observer.processes.stats(),
            **({"otlp": observer.otlp_status()} if observer.otlp_status else {}),
        })

    route(app, "GET", "/v1/flows", flows_handler, query=FLOW_PARAMS,
          summary="flows (GetFlowsResponse JSON); follow=true streams them as SSE")
    route(app, "GET", "/v1/flows/ws", flows_ws, query=FLOW_PARAMS,
          summary="follow flows over a websocket, one GetFlowsResponse per message")
    route(app, "GET", "/v1/events", events_handler, query=proc.EVENT_PARAMS,
          summary="process events (Tetragon JSON); follow=true streams them as SSE")
    route(app, "GET", "/v1/events/ws", events_ws, query=proc.EVENT_PARAMS,
          summary="follow process events over a websocket")
    route(app, "GET", "/v1/servicemap", service_map, query=FLOW_PARAMS,
          summary="workloads and the flows between them, edges by verdict")
    route(app, "GET", "/v1/observer/status", observer_status,
          summary="ring sizes, flows seen, nodes (Hubble's ServerStatus)")
    _add_ui(app)

    async def close_followers(_: web.Application) -> None:
        observer.close_followers()

    app.on_shutdown.append(close_followers)
    await _start_export(ctx, observer)
    await _start_otlp(ctx, observer)

    def status() -> None:
        ctx.status["flows_seen"] = observer.flows.received_total
        ctx.status["nodes"] = sorted(observer.flows.rings)

    ctx.status["ring_size"] = config.ring_size
    ctx.status["metrics"] = [o.name for o in config.metrics]
    status()

    async def refresh() -> None:
        while True:
            status()
            await asyncio.sleep(2.0)

    ctx.spawn(refresh(), name="status")


OBSERVER_KEY = web.AppKey("events.observer", Observer)

SPEC = ServiceSpec(name="events", setup=setup, per_node=False)
