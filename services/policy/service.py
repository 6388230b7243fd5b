"""Wires the policy service: its kinds stored through the generic resource REST."""

from __future__ import annotations

from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.runner import ServiceContext, ServiceSpec


async def setup(ctx: ServiceContext) -> None:
    ResourceHandlers(ctx.database, owned_kinds("policy")).register(ctx.app)


SPEC = ServiceSpec(name="policy", setup=setup, uses_db=True)
