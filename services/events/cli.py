"""``ciliate observe`` (hubble observe) and ``ciliate getevents`` (tetra getevents).

Filter flags are turned into Hubble's whitelist/blacklist here, in command-line order (that
order matters to ``--not``), and sent as JSON; the events service filters, merges nodes by time
and streams follow mode over SSE. Flows travel in their wire form and are printed here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import click

from ciliate.cli.output import fail, run
from ciliate.client import ApiError, Client, ClientContext, ContextMissing
from ciliate.client.rest import Query
from ciliate.flows import Flow, compact_record, dict_block, get_flows_response, is_lost
from ciliate.flows.printer import TABLE_HEADER, align, table_row
from ciliate.process_events import EVENT_KINDS
from services.events.core import process as proc
from services.events.core.cliflags import FILTER_FLAGS, VALUELESS_FLAGS, filters_from_flags
from services.events.core.filters import FilterError

SERVICE = "events"
SHORT_FLAGS = {"-t": "type", "-n": "namespace"}
OUTPUTS = ("compact", "json", "jsonpb", "table", "dict")
DEFAULT_LAST = 20
"""hubble observe prints the last 20 flows when given no window and not following."""


class OrderedCommand(click.Command):
    """Keeps the raw arguments: ``--not`` applies to the flag right after it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


def ordered_filter_flags(args: list[str]) -> list[tuple[str, str]]:
    """(flag, value) pairs of the filter flags, in the order they were given."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            break
        name, value = "", None
        if token.startswith("--"):
            name, eq, rest = token[2:].partition("=")
            value = rest if eq else None
        elif token in SHORT_FLAGS:
            name = SHORT_FLAGS[token]
        elif token[:2] in SHORT_FLAGS and len(token) > 2:
            name, value = SHORT_FLAGS[token[:2]], token[2:]
        if name not in FILTER_FLAGS:
            continue
        if name in VALUELESS_FLAGS:
            out.append((name, ""))
            continue
        if value is None:
            if i >= len(args):
                break
            value = args[i]
            i += 1
        out.append((name, value))
    return out


def _filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(FILTER_FLAGS):
        decls = [f"--{name}"] + [s for s, n in SHORT_FLAGS.items() if n == name]
        if name in VALUELESS_FLAGS:
            f = click.option(*decls, f"filter_{name.replace('-', '_')}", is_flag=True,
                             multiple=False, help=f"hubble's --{name}")(f)
        else:
            f = click.option(*decls, f"filter_{name.replace('-', '_')}", multiple=True,
                             metavar="VALUE", help=f"hubble's --{name} (repeat to OR)")(f)
    return f


async def _sse_records(context: ClientContext, path: str,
                       params: Query) -> AsyncIterator[dict[str, Any]]:
    """Each ``data:`` line of an SSE stream, decoded, from the first replica that answers."""
    urls = context.urls(SERVICE)
    if not urls:
        raise ApiError(503, {"detail": "no events service in the context"}, SERVICE, path)
    headers = {"Authorization": f"Bearer {context.token}", "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        last: Exception | None = None
        for base in urls:
            try:
                async with session.get(base + path, params=params) as resp:
                    if resp.status >= 400:
                        body = await resp.json(content_type=None)
                        raise ApiError(resp.status, body, SERVICE, path)
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("data: "):
                            yield json.loads(line[6:])
                    return
            except aiohttp.ClientConnectionError as exc:
                last = exc
        raise ApiError(503, {"detail": f"no events replica answered: {last}"}, SERVICE, path)


class FlowPrinter:
    def __init__(self, output: str, node_name: bool) -> None:
        self.output = output
        self.node_name = node_name
        self.count = 0

    def __call__(self, w: dict[str, Any]) -> None:
        if self.output in ("json", "jsonpb"):
            click.echo(json.dumps(get_flows_response(w), separators=(",", ":")))
        elif self.output == "dict" and not is_lost(w):
            click.echo(dict_block(Flow.from_wire(w), first=self.count == 0,
                                  node_name=self.node_name))
        elif self.output == "table" and not is_lost(w):
            header = list(TABLE_HEADER)
            if self.node_name:
                header.insert(1, "NODE")
            rows = [table_row(Flow.from_wire(w), node_name=self.node_name)]
            lines = align([header, *rows]).splitlines()
            click.echo("\n".join(lines if self.count == 0 else lines[1:]))
        else:
            click.echo(compact_record(w, node_name=self.node_name))
        self.count += 1

    def all(self, records: list[dict[str, Any]]) -> None:
        if self.output == "table":
            flows = [Flow.from_wire(w) for w in records if not is_lost(w)]
            header = list(TABLE_HEADER)
            if self.node_name:
                header.insert(1, "NODE")
            rows = [table_row(f, node_name=self.node_name) for f in flows]
            if rows:
                click.echo(align([header, *rows]))
            for w in records:
                if is_lost(w):
                    click.echo(compact_record(w))
            return
        for w in records:
            self(w)


def _window(params: dict[str, str], since: str | None, until: str | None, last: int | None,
            first: int | None, every: bool, follow: bool) -> None:
    if last is not None and first is not None:
        fail("--last and --first cannot be combined", 2)
    if since:
        params["since"] = since
    if until:
        params["until"] = until
    if first is not None:
        params["first"] = str(first)
    elif last is not None:
        params["last"] = str(last)
    elif every:
        params["all"] = "true"
    elif not follow and not since and not until:
        params["last"] = str(DEFAULT_LAST)
    if follow:
        params["follow"] = "true"


async def _observe(params: dict[str, str], follow: bool, printer: FlowPrinter) -> None:
    context = ClientContext.load()
    if follow:
        async for w in _sse_records(context, "/v1/flows", params):
            printer(w)
        return
    async with Client(context) as client:
        body = await client.get(SERVICE, "/v1/flows", params=params)
    printer.all(body["flows"])


@click.command("observe", cls=OrderedCommand)
@_filter_options
@click.option("--since", help="RFC 3339 time or a duration back from now (5m, 1h)")
@click.option("--until", help="RFC 3339 time or a duration back from now")
@click.option("--last", type=click.IntRange(min=0), help="the last N flows")
@click.option("--first", type=click.IntRange(min=0), help="the first N flows")
@click.option("--all", "every", is_flag=True, help="every flow the rings hold")
@click.option("-f", "--follow", is_flag=True, help="keep printing new flows")
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="compact",
              show_default=True)
@click.option("--print-node-name", is_flag=True, help="show the node of each flow")
@click.pass_context
def observe(ctx: click.Context, /, since: str | None, until: str | None, last: int | None,
            first: int | None, every: bool, follow: bool, output: str, print_node_name: bool,
            **_filters: Any) -> None:
    """Observe flows as `hubble observe` does (filters, --not, --last/--first, -f)."""
    try:
        white, black = filters_from_flags(ordered_filter_flags(ctx.meta.get("raw_args", [])))
    except FilterError as exc:
        fail(f"invalid filter --{exc.field}: {exc.message}", 2)
        return
    params: dict[str, str] = {"encoding": "wire"}
    if white:
        params["whitelist"] = json.dumps([f.to_json() for f in white])
    if black:
        params["blacklist"] = json.dumps([f.to_json() for f in black])
    _window(params, since, until, last, first, every, follow)
    try:
        run(_observe(params, follow, FlowPrinter(output, print_node_name)))
    except (ContextMissing, ApiError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


async def _getevents(params: Query, follow: bool, output: str) -> None:
    def show(event: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(event, separators=(",", ":")))
        else:
            click.echo(proc.compact(_lost_back(event)))

    context = ClientContext.load()
    if follow:
        async for event in _sse_records(context, "/v1/events", params):
            show(event)
        return
    async with Client(context) as client:
        body = await client.get(SERVICE, "/v1/events", params=params)
    for event in body["events"]:
        show(event)


def _lost_back(event: dict[str, Any]) -> dict[str, Any]:
    info = event.get("rate_limit_info")
    if isinstance(info, dict):
        return {"k": "lost", "ln": int(info.get("number_of_dropped_process_events", 0))}
    return event


@click.command("getevents")
@click.option("--namespace", multiple=True, help="pod namespace (repeat to OR)")
@click.option("--pod", multiple=True, help="pod name or ns/name (repeat to OR)")
@click.option("--process", multiple=True, help="binary regular expression (repeat to OR)")
@click.option("--event-types", "event_types", multiple=True,
              type=click.Choice(EVENT_KINDS), help="event kinds (repeat to OR)")
@click.option("--policy-names", "policy_names", multiple=True,
              help="only events of this TracingPolicy (repeat to OR)")
@click.option("--last", type=click.IntRange(min=0), help="print the last N events first")
@click.option("--since", help="RFC 3339 time or a duration back from now")
@click.option("--no-follow", is_flag=True, help="print what is held and exit")
@click.option("-o", "--output", type=click.Choice(["json", "compact"]), default="json",
              show_default=True)
def getevents(namespace: tuple[str, ...], pod: tuple[str, ...], process: tuple[str, ...],
              event_types: tuple[str, ...], policy_names: tuple[str, ...], last: int | None,
              since: str | None, no_follow: bool, output: str) -> None:
    """Stream process events as `tetra getevents` does (Tetragon's JSON or compact lines)."""
    params: list[tuple[str, str]] = [
        (key, value)
        for key, values in (("namespace", namespace), ("pod", pod), ("process", process),
                            ("event_type", event_types), ("policy_name", policy_names))
        for value in values
    ]
    if last is not None:
        params.append(("last", str(last)))
    if since:
        params.append(("since", since))
    if no_follow and last is None and not since:
        params.append(("all", "true"))
    if not no_follow:
        params.append(("follow", "true"))
    try:
        run(_getevents(params, not no_follow, output))
    except (ContextMissing, ApiError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
