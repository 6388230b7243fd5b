"""The per-node agents' REST edge needs the token too: every route of the datapath and
security agents' OpenAPI documents, walked without it, on a stack started as ``ciliate up``
starts it (agents included, one node). Root only: the agents load BPF programs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from reliability_support import AGENTS, NON_AGENTS, OPEN_ROUTES, start_stack, walk_routes

from ciliate.stack.supervisor import Stack

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="the agents need root (BPF, netns, cgroups)"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("auth-agents") / "state",
                    services=NON_AGENTS + AGENTS, agents=True)
    try:
        assert not s.skipped, s.skipped
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("agent", AGENTS)
async def test_every_agent_route_but_health_needs_the_token(stack: Stack, agent: str) -> None:
    ops = await walk_routes(stack, agent, OPEN_ROUTES)
    assert len(ops) > len(OPEN_ROUTES), ops  # the agent documents routes of its own
