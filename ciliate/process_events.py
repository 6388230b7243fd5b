"""Tetragon's process events, defined once: event kinds and the compact one-line format.

The security agent produces these events (Tetragon's GetEventsResponse JSON) and the events
service serves them; both print them with :func:`compact`, as ``tetra getevents -o compact``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EVENT_KINDS = ("process_exec", "process_exit", "process_tracepoint", "process_kprobe",
               "process_lsm", "process_uprobe")

_KPROBE_LABELS = {
    "sys_write": ("📝", "write"),
    "sys_read": ("📚", "read"),
    "sys_openat": ("📬️", "openat"),
    "sys_open": ("📬️", "open"),
    "sys_close": ("📪", "close"),
    "sys_mount": ("💾", "mount"),
    "sys_setuid": ("🔑", "setuid"),
    "fd_install": ("📬", "open"),
    "tcp_connect": ("🔌", "connect"),
}
"""Kprobe functions Tetragon's compact printer names; the rest print as ``❓ syscall FN``."""


def event_kind(event: Mapping[str, Any]) -> str:
    """The ``process_*`` key of an event (``unknown`` when it has none)."""
    for key in event:
        if key.startswith("process_"):
            return key
    return "unknown"


def _where(event: Mapping[str, Any], process: Mapping[str, Any]) -> str:
    pod = process.get("pod")
    if pod:
        return f"{pod.get('namespace', '')}/{pod.get('name', '')}"
    return str(event.get("node_name", ""))


def _syscall_name(function: str) -> str:
    """``__x64_sys_openat`` -> ``sys_openat``: the architecture prefix is cut, as Tetragon does."""
    for prefix in ("__x64_", "__ia32_", "__arm64_"):
        if function.startswith(prefix):
            return function[len(prefix):]
    return function


def compact(event: Mapping[str, Any]) -> str:
    """Tetragon's compact line: symbol, action, where (ns/pod or node), binary, details."""
    kind = event_kind(event)
    body = event.get(kind) or {}
    process = body.get("process") or {}
    info = f"{_where(event, process)} {process.get('binary', '')}"
    args = process.get("arguments", "")
    if kind == "process_exec":
        return f"🚀 {'process':<7} {info} {args}".rstrip()
    if kind == "process_exit":
        status = body.get("signal") or str(body.get("status", 0))
        return f"💥 {'exit':<7} {info} {args} {status}"
    if kind == "process_tracepoint":
        return f"⁉️ {'tracepoint':<7} {info} {body.get('subsys', '')} {body.get('event', '')}"
    if kind == "process_kprobe":
        function = str(body.get("function_name", ""))
        symbol, label = _KPROBE_LABELS.get(_syscall_name(function), ("❓", "syscall"))
        tail = "" if label != "syscall" else f" {function}"
        return f"{symbol} {label:<7} {info}{tail}"
    if kind == "process_uprobe":
        return f"🕵️ {'uprobe':<7} {info} {body.get('path', '')} {body.get('symbol', '')}"
    return f"❓ {kind} {info}"
