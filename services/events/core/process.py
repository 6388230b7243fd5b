"""Process events (Tetragon's JSON) in the observer: time key, filters, compact text, loss.

Events arrive as Tetragon's GetEventsResponse JSON objects (``{"process_exec": {...},
"node_name": ..., "time": ...}``). The ring needs a sortable time, so ingest adds ``t``
(nanoseconds) to each event; ``public`` removes it again before anything is shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from ciliate.flows.jsonpb import parse_rfc3339, rfc3339
from ciliate.flows.model import LostEvent, Wire, is_lost
from ciliate.process_events import EVENT_KINDS, event_kind
from ciliate.process_events import compact as compact_event
from services.events.core.request import RequestError

EVENT_PARAMS = ("namespace", "pod", "process", "event_type", "policy_name", "node", "since",
                "until", "first", "last", "all", "follow")


kind_of = event_kind


def stamp(event: Wire, now_ns: int) -> Wire:
    """Give the event its ring time ``t`` (from ``time``, else arrival) and return it."""
    text = event.get("time")
    t = now_ns
    if isinstance(text, str):
        try:
            t = parse_rfc3339(text)
        except ValueError:
            t = now_ns
    event["t"] = t
    return event


def public(event: Wire) -> dict[str, Any]:
    """The event as Tetragon prints it; a lost record becomes ``rate_limit_info``."""
    if is_lost(event):
        lost = LostEvent.from_wire(event)
        out: dict[str, Any] = {"rate_limit_info": {
            "number_of_dropped_process_events": str(lost.num_events_lost)}}
        if lost.node_name:
            out["node_name"] = lost.node_name
        if lost.time_ns:
            out["time"] = rfc3339(lost.time_ns)
        return out
    return {k: v for k, v in event.items() if k != "t"}


def _process(event: Wire) -> dict[str, Any]:
    body = event.get(kind_of(event))
    if not isinstance(body, dict):
        return {}
    proc = body.get("process")
    return proc if isinstance(proc, dict) else {}


def make_predicate(namespaces: Sequence[str], pods: Sequence[str], processes: Sequence[str],
                   kinds: Sequence[str], policy_names: Sequence[str] = ()
                   ) -> Callable[[Wire], bool]:
    """tetra getevents filters: each kind of filter ORs its values; kinds AND; loss passes.

    ``policy_names`` keeps only events a TracingPolicy produced under one of those names."""
    for k in kinds:
        if k not in EVENT_KINDS:
            raise RequestError("event_type", f"unknown event type {k!r}; known: "
                                             f"{', '.join(EVENT_KINDS)}")
    try:
        binaries = [re.compile(p) for p in processes]
    except re.error as exc:
        raise RequestError("process", f"invalid regular expression: {exc}") from None
    ns_set, pod_set, kind_set = set(namespaces), set(pods), set(kinds)
    policy_set = set(policy_names)

    def match(event: Wire) -> bool:
        if is_lost(event):
            return True
        if kind_set and kind_of(event) not in kind_set:
            return False
        if policy_set and (event.get(kind_of(event)) or {}).get("policy_name") not in policy_set:
            return False
        proc = _process(event)
        pod = proc.get("pod") or {}
        if ns_set and pod.get("namespace") not in ns_set:
            return False
        if pod_set:
            name, ns = pod.get("name", ""), pod.get("namespace", "")
            if name not in pod_set and f"{ns}/{name}" not in pod_set:
                return False
        if binaries:
            binary = str(proc.get("binary", ""))
            if not any(b.search(binary) for b in binaries):
                return False
        return True

    return match


def compact(event: Wire) -> str:
    """Tetragon's compact line; a lost-events record says how many were lost."""
    if is_lost(event):
        return f"EVENTS LOST: {LostEvent.from_wire(event).num_events_lost}"
    return compact_event(event)
