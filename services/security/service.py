"""Wires the security service: its kinds stored through the generic resource REST (skeleton)."""

from __future__ import annotations

from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.runner import ServiceContext, ServiceSpec


async def setup(ctx: ServiceContext) -> None:
    ResourceHandlers(ctx.database, owned_kinds("security")).register(ctx.app)


SPEC = ServiceSpec(name="security", setup=setup, uses_db=True, per_node=True)
