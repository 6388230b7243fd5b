"""Service commands arrive as entry points, so the CLI never imports a service by name.

``ciliate.commands``: click commands/groups added at the top level (groups of the same name are
merged, so two services can both add to ``bpf``). ``ciliate.services``: ``ServiceSpec`` objects
that ``ciliate run NAME`` starts.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

import click

log = logging.getLogger("ciliate.cli")


def service_specs() -> dict[str, Any]:
    """Service name -> entry point (loaded lazily: starting one service imports only it)."""
    return {ep.name: ep for ep in entry_points(group="ciliate.services")}


def _merge(target: click.Group, command: click.Command) -> None:
    name = command.name or ""
    existing = target.commands.get(name)
    if isinstance(existing, click.Group) and isinstance(command, click.Group):
        for sub in command.commands.values():
            _merge(existing, sub)
    else:
        target.add_command(command, name)


def add_plugin_commands(root: click.Group) -> list[str]:
    """Load every ``ciliate.commands`` entry point; a broken plugin is reported, not fatal."""
    broken = []
    for ep in sorted(entry_points(group="ciliate.commands"), key=lambda e: e.name):
        try:
            command = ep.load()
        except Exception as exc:  # a plugin failing to import must not take the CLI down
            broken.append(f"{ep.name}: {exc}")
            continue
        if isinstance(command, click.Command):
            _merge(root, command)
    return broken
