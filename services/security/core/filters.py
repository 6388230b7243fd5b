"""Event filters with Tetragon's export allow/deny-list fields, also behind `getevents` flags.

A filter matches when every field it sets matches (fields are ANDed, values inside one field
ORed). An event is exported when the allow list is empty or any allow filter matches, and no
deny filter matches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.process_events import event_kind

# Tetragon's EventType enum names, by the JSON key of the event.
EVENT_SET_NAMES = {
    "process_exec": "PROCESS_EXEC",
    "process_exit": "PROCESS_EXIT",
    "process_kprobe": "PROCESS_KPROBE",
    "process_tracepoint": "PROCESS_TRACEPOINT",
    "process_lsm": "PROCESS_LSM",
}
FIELDS = ("event_set", "namespace", "pod_regex", "binary_regex", "policy_names", "pid")


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class EventFilter:
    event_set: frozenset[str] = frozenset()
    namespace: frozenset[str] = frozenset()
    pod_regex: tuple[re.Pattern[str], ...] = ()
    binary_regex: tuple[re.Pattern[str], ...] = ()
    policy_names: frozenset[str] = frozenset()
    pid: frozenset[int] = frozenset()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> EventFilter:
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise FilterError(f"unknown filter field(s) {', '.join(unknown)}; "
                              f"known: {', '.join(FIELDS)}")
        events = frozenset(str(e) for e in raw.get("event_set", []))
        bad = sorted(events - set(EVENT_SET_NAMES.values()))
        if bad:
            raise FilterError(f"event_set: unknown event type(s) {', '.join(bad)}")
        try:
            return cls(
                event_set=events,
                namespace=frozenset(str(n) for n in raw.get("namespace", [])),
                pod_regex=tuple(re.compile(str(r)) for r in raw.get("pod_regex", [])),
                binary_regex=tuple(re.compile(str(r)) for r in raw.get("binary_regex", [])),
                policy_names=frozenset(str(n) for n in raw.get("policy_names", [])),
                pid=frozenset(int(p) for p in raw.get("pid", [])),
            )
        except re.error as exc:
            raise FilterError(f"bad regular expression: {exc}") from None

    def matches(self, event: Mapping[str, Any]) -> bool:
        kind = event_kind(event)
        body = event.get(kind) or {}
        proc = body.get("process") or {}
        pod = proc.get("pod") or {}
        if self.event_set and EVENT_SET_NAMES.get(kind) not in self.event_set:
            return False
        if self.namespace and pod.get("namespace", "") not in self.namespace:
            return False
        if self.pod_regex and not any(r.search(pod.get("name", "")) for r in self.pod_regex):
            return False
        if self.binary_regex and not any(
            r.search(proc.get("binary", "")) for r in self.binary_regex
        ):
            return False
        if self.policy_names and body.get("policy_name") not in self.policy_names:
            return False
        return not (self.pid and proc.get("pid") not in self.pid)


def parse_filter_lines(text: str) -> list[EventFilter]:
    """Tetragon's `--export-allowlist` syntax: one JSON object per line (blank lines skipped)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FilterError(f"line {number}: {exc}") from None
        if not isinstance(raw, dict):
            raise FilterError(f"line {number}: expected a JSON object")
        try:
            out.append(EventFilter.from_json(raw))
        except FilterError as exc:
            raise FilterError(f"line {number}: {exc}") from None
    return out


@dataclass(frozen=True)
class AllowDeny:
    allow: Sequence[EventFilter] = ()
    deny: Sequence[EventFilter] = field(default_factory=tuple)

    def passes(self, event: Mapping[str, Any]) -> bool:
        if self.allow and not any(f.matches(event) for f in self.allow):
            return False
        return not any(f.matches(event) for f in self.deny)


def from_flags(namespaces: Iterable[str], pods: Iterable[str], processes: Iterable[str],
               policy_names: Iterable[str]) -> AllowDeny:
    """`getevents --namespace/--pod/--process/--policy-names`: one allow filter (Tetragon's
    `--pods` and `--processes` are regular expressions)."""
    raw: dict[str, Any] = {}
    if ns := list(namespaces):
        raw["namespace"] = ns
    if pod := list(pods):
        raw["pod_regex"] = pod
    if proc := list(processes):
        raw["binary_regex"] = proc
    if pol := list(policy_names):
        raw["policy_names"] = pol
    return AllowDeny(allow=(EventFilter.from_json(raw),) if raw else ())
