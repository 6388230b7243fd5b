"""The OTLP exporter's bookkeeping against stand-in exporters (no network): emit never waits
for a stuck collector (what does not fit the queue is counted), and failed or raising
exports are counted, never raised."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult

from ciliate.flows import Flow, Verdict
from ciliate.testing import wait_until
from services.events.core.config import OtlpConfig
from services.events.export_otlp import OtlpExporter


class Stuck(LogRecordExporter):
    """Holds every export until released; then succeeds, fails or raises as told."""

    def __init__(self, outcome: str = "ok") -> None:
        self.release = threading.Event()
        self.outcome = outcome
        self.bodies: list[object] = []

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.release.wait(10)
        if self.outcome == "raise":
            raise ConnectionError("collector gone")
        if self.outcome == "fail":
            return LogRecordExportResult.FAILURE
        self.bodies.extend(r.log_record.body for r in batch)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _wires(n: int) -> list[dict[str, object]]:
    return [Flow(time_ns=i + 1, uuid=f"u{i}", verdict=Verdict.FORWARDED).to_wire()
            for i in range(n)]


async def test_emit_never_waits_for_a_stuck_collector_and_counts_what_did_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "20")
    inner = Stuck()
    exporter = OtlpExporter(OtlpConfig(endpoint="http://unused/v1/logs", queue=4), inner=inner)
    try:
        start = time.monotonic()
        exporter.emit(_wires(20))
        assert time.monotonic() - start < 1.0
        st = exporter.stats()
        assert (st["emitted"], st["queue_dropped"]) == (4, 16)
        inner.release.set()
        await wait_until(lambda: exporter.stats()["exported"] == 4, what="4 exported")
        exporter.emit(_wires(2))
        await wait_until(lambda: exporter.stats()["exported"] == 6, what="6 exported")
        assert exporter.stats()["queue_dropped"] == 16 and len(inner.bodies) == 6
    finally:
        exporter.shutdown(1)


async def test_failed_and_raising_exports_are_counted() -> None:
    for outcome in ("fail", "raise"):
        inner = Stuck(outcome)
        inner.release.set()
        exporter = OtlpExporter(OtlpConfig(endpoint="http://unused/v1/logs"), inner=inner)
        try:
            exporter.emit(_wires(3))
            exporter.processor.force_flush(5000)
            st = await wait_until(lambda e=exporter: e.stats()["failed"] == 3 and e.stats(),
                                  what=f"{outcome}: 3 failed")
            assert st["exported"] == 0 and st["failed_exports"] >= 1
            assert ("collector gone" in st["last_error"]) == (outcome == "raise")
        finally:
            exporter.shutdown(1)
