"""Wires the identity service: its kinds stored through the generic resource REST (skeleton)."""

from __future__ import annotations

from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.runner import ServiceContext, ServiceSpec


async def setup(ctx: ServiceContext) -> None:
    ResourceHandlers(ctx.database, owned_kinds("identity")).register(ctx.app)


SPEC = ServiceSpec(name="identity", setup=setup, uses_db=True, per_node=False)
