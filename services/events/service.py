"""Wires the events service (skeleton: starts, registers, answers health)."""

from __future__ import annotations

from ciliate.runner import ServiceContext, ServiceSpec


async def setup(ctx: ServiceContext) -> None:
    ctx.status["state"] = "skeleton"


SPEC = ServiceSpec(name="events", setup=setup, per_node=False)
