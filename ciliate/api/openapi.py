"""Routes registered with their description, so ``/openapi.json`` lists every one of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES_KEY = web.AppKey("ciliate.routes", list["RouteDoc"])


@dataclass(frozen=True)
class RouteDoc:
    method: str
    path: str
    summary: str
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    open: bool = False
    query: tuple[str, ...] = field(default_factory=tuple)


def route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    *,
    summary: str,
    request_schema: dict[str, Any] | None = None,
    response_schema: dict[str, Any] | None = None,
    query: tuple[str, ...] = (),
    open: bool = False,
) -> None:
    """Add a route and its OpenAPI entry. ``open`` routes skip bearer auth (health only)."""
    app.router.add_route(method, path, handler)
    app[ROUTES_KEY].append(
        RouteDoc(method.upper(), path, summary, request_schema, response_schema, open, query)
    )


def _params(path: str, query: tuple[str, ...]) -> list[dict[str, Any]]:
    params = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1].split(":")[0]
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string"}})
    for name in query:
        params.append({"name": name, "in": "query", "required": False,
                       "schema": {"type": "string"}})
    return params


def document(app: web.Application, title: str, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    problem = {"description": "problem", "content": {"application/problem+json": {
        "schema": {"type": "object"}}}}
    for doc in app[ROUTES_KEY]:
        path = "/".join(
            "{" + p[1:-1].split(":")[0] + "}" if p.startswith("{") else p
            for p in doc.path.split("/")
        )
        op: dict[str, Any] = {
            "summary": doc.summary,
            "operationId": f"{doc.method.lower()}_{path.strip('/').replace('/', '_')}".replace(
                "{", "").replace("}", ""),
            "parameters": _params(doc.path, doc.query),
            "responses": {
                "200": {"description": "ok", "content": {"application/json": {
                    "schema": doc.response_schema or {}}}},
                "400": problem, "401": problem, "404": problem, "413": problem,
                "422": problem, "503": problem,
            },
        }
        if doc.open:
            op["security"] = []
            for code in ("401", "413", "422"):
                op["responses"].pop(code)
        if doc.request_schema is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": doc.request_schema}}}
        paths.setdefault(path, {})[doc.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
