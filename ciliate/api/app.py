"""The aiohttp application base every service uses.

Bearer-token auth on every route but the health checks, problem documents for every error,
a request size limit, ``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ciliate import __version__
from ciliate.api.openapi import ROUTES_KEY, Handler, document, route
from ciliate.api.problems import Problem, field_problem, render
from ciliate.resources.base import ResourceError

log = logging.getLogger("ciliate.api")

DEFAULT_MAX_BODY = 1024 * 1024

ReadinessCheck = Callable[[], Awaitable[bool]]

REGISTRY_KEY = web.AppKey("ciliate.registry", CollectorRegistry)
READINESS_KEY = web.AppKey("ciliate.readiness", dict[str, ReadinessCheck])
TOKEN_KEY = web.AppKey("ciliate.token", str)
NAME_KEY = web.AppKey("ciliate.name", str)
StatusProvider = Callable[[], dict[str, Any]]
STATUS_KEY: web.AppKey[StatusProvider] = web.AppKey("ciliate.status")


def _open_paths(app: web.Application) -> set[tuple[str, str]]:
    return {(d.method, d.path) for d in app[ROUTES_KEY] if d.open}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem:
        raise
    except web.HTTPRequestEntityTooLarge as exc:
        return render(413, exc.text or "request body too large")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return render(exc.status, exc.reason)
        raise
    except ResourceError as exc:
        raise Problem(422, str(exc), errors=exc.as_dicts()) from None
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return render(500, "internal error")


def _auth(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        info = request.match_info.route.resource
        canonical = info.canonical if info is not None else request.path
        if (request.method, canonical) in _open_paths(request.app) or not token:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Problem(401, "missing or wrong bearer token")
        return await handler(request)

    return middleware


def _metrics_middleware(registry: CollectorRegistry) -> Any:
    requests = Counter("ciliate_api_requests_total", "REST requests", ["method", "code"],
                       registry=registry)
    latency = Histogram("ciliate_api_request_seconds", "REST request latency", ["method"],
                        registry=registry)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            requests.labels(request.method, str(code)).inc()
            latency.labels(request.method).observe(time.perf_counter() - start)

    return middleware


def make_app(name: str, *, token: str, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    registry = CollectorRegistry()
    app = web.Application(
        client_max_size=max_body,
        middlewares=[_metrics_middleware(registry), _errors, _auth(token)],
    )
    app[ROUTES_KEY] = []
    app[REGISTRY_KEY] = registry
    app[READINESS_KEY] = {}
    app[TOKEN_KEY] = token
    app[NAME_KEY] = name
    app[STATUS_KEY] = dict

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": name})

    async def readyz(request: web.Request) -> web.Response:
        checks = {k: await check() for k, check in request.app[READINESS_KEY].items()}
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[REGISTRY_KEY])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document(request.app, f"ciliate {name}", __version__))

    async def status(request: web.Request) -> web.Response:
        return web.json_response(request.app[STATUS_KEY]())

    route(app, "GET", "/healthz", healthz, summary="liveness", open=True)
    route(app, "GET", "/readyz", readyz, summary="readiness: NATS and the database", open=True)
    route(app, "GET", "/metrics", metrics, summary="Prometheus metrics")
    route(app, "GET", "/openapi.json", openapi, summary="this document")
    route(app, "GET", "/v1/status", status, summary="service status details")
    return app


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; malformed or non-JSON bodies are a 400 naming the body."""
    if request.content_type not in ("application/json", ""):
        raise field_problem(415, "body", f"expected application/json, got {request.content_type}")
    raw = await request.read()
    if not raw:
        raise field_problem(400, "body", "empty body")
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints over 4300 digits
        raise field_problem(400, "body", f"malformed JSON: {exc}") from None
    except RecursionError:
        # json.loads recurses per nesting level: a 1 MiB body of brackets is a 400, not a 500.
        raise field_problem(400, "body", "JSON nested too deeply") from None


async def read_object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise field_problem(422, "body", "expected a JSON object")
    return body
