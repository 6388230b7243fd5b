"""The web UI in headless Chromium: a denied flow injected on NATS shows up in the live flow
table and as a red edge on the service map; screenshots are kept with the test's output."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ciliate.bus import Bus
from ciliate.flows import Endpoint, Flow, TCPFlag, TrafficDirection, Verdict, drop_flow_defaults
from services.events.testing import TOKEN, EventsService, start_service, stop_all

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RED = "rgb(214, 39, 40)"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="Debian's chromium is not installed at /usr/bin/chromium "
                              "(apt-get install -y chromium)"),
]


@pytest.fixture
async def events(nats_url: str, bus: Bus, tmp_path: Path) -> AsyncIterator[EventsService]:
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    sessions: list[aiohttp.ClientSession] = []
    try:
        yield await start_service(nats_url, bus, tmp_path, stops, sessions)
    finally:
        await stop_all(stops, sessions)


def _flows(now: int) -> list[Flow]:
    web = Endpoint(id=11, identity=1001, namespace="shop", pod_name="web-5d4f8b6c9-x2k9q",
                   labels=["k8s:app=web"])
    db = Endpoint(id=12, identity=1002, namespace="shop", pod_name="db-6b9f7c8d5-k2lmn",
                  labels=["k8s:app=db"])
    intruder = Endpoint(id=13, identity=1003, namespace="other", pod_name="intruder-7c9d6f-p8m2z",
                        labels=["k8s:app=intruder"])
    common = dict(ip_version=1, protocol=6, tcp_flags=TCPFlag.SYN, is_reply=False,
                  traffic_direction=TrafficDirection.INGRESS, node_name="n1")
    allowed = Flow(time_ns=now, uuid="allowed-1", verdict=Verdict.FORWARDED, event_type=4,
                   source_ip="10.0.1.1", destination_ip="10.0.1.2", source_port=40000,
                   destination_port=5432, source=web, destination=db, **common)  # type: ignore[arg-type]
    denied = drop_flow_defaults(Flow(
        time_ns=now + 1, uuid="denied-1", source_ip="10.0.2.9", destination_ip="10.0.1.2",
        source_port=40001, destination_port=5432, source=intruder, destination=db,
        **common), 133)  # type: ignore[arg-type]
    return [allowed, denied]


def _keep(shot: Path) -> None:
    out = os.environ.get("CILIATE_TEST_OUTPUT")
    if out:
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


async def test_denied_flow_appears_in_table_and_as_red_edge(events: EventsService,
                                                            tmp_path: Path) -> None:
    async_api = pytest.importorskip("playwright.async_api",
                                    reason="playwright is not installed in the virtualenv")
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                           headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(f"{events.base}/ui/#token={TOKEN}")
            await page.wait_for_selector("#conn.conn-on", timeout=15_000)
            assert "token=" not in page.url  # the token leaves the address bar
            await events.publish_flows("n1", _flows(time.time_ns()))

            edge = page.locator('line.edge[data-verdict="DROPPED"]')
            await edge.first.wait_for(state="attached", timeout=15_000)
            assert await edge.first.get_attribute("data-source") == "other/intruder"
            assert await edge.first.get_attribute("data-destination") == "shop/db"
            stroke = await edge.first.evaluate("e => getComputedStyle(e).stroke")
            assert stroke == RED
            green = page.locator('line.edge[data-verdict="FORWARDED"]')
            assert await green.first.get_attribute("data-source") == "shop/web"
            map_shot = tmp_path / "ui-service-map.png"
            await page.screenshot(path=str(map_shot), full_page=True)
            _keep(map_shot)

            await page.click('#tabs button[data-tab="flows"]')
            row = page.locator('#flows-table tbody tr[data-verdict="DROPPED"]')
            await row.first.wait_for(timeout=15_000)
            text = await row.first.inner_text()
            assert "other/intruder-7c9d6f-p8m2z:40001" in text
            assert "shop/db-6b9f7c8d5-k2lmn:5432" in text and "POLICY_DENIED" in text
            assert await row.first.evaluate(
                "r => getComputedStyle(r.querySelector('td.verdict')).color") == RED
            flows_shot = tmp_path / "ui-flows.png"
            await page.screenshot(path=str(flows_shot), full_page=True)
            _keep(flows_shot)
            assert map_shot.stat().st_size > 0 and flows_shot.stat().st_size > 0
        finally:
            await browser.close()
