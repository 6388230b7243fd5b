"""OTLP/HTTP export of flows as log records, through the OpenTelemetry SDK (I/O only).

What is exported and how a record looks is decided by the pure ``ExporterCore.render_log``
(allow/deny lists, field mask, body = GetFlowsResponse JSON, attributes). Here the records
go to a ``BatchLogRecordProcessor``: ``emit`` only appends to its bounded queue, and the SDK's
worker thread batches and POSTs them to ``<endpoint>`` (protobuf), so a slow or absent
collector never blocks the event loop. Nothing is lost in silence: records that do not fit the
queue are counted (``queue_dropped``), and every batch the exporter could not deliver
(HTTP error, connection refused, timeout, encoding) is counted by records and calls
(``failed``, ``failed_exports``, ``last_error``); none of it raises into ingest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.resources import Resource

from ciliate.flows.model import Wire
from services.events.core.config import OtlpConfig
from services.events.core.exporter import ExporterCore

log = logging.getLogger("ciliate.events.otlp")

EXPORT_BATCH = 512
"""Log records per OTLP request (the SDK's default)."""


class CountingExporter(LogRecordExporter):
    """Wraps the OTLP exporter: counts what was handed over, delivered and failed."""

    def __init__(self, inner: LogRecordExporter) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.handed = 0
        self.exported = 0
        self.failed = 0
        self.failed_exports = 0
        self.last_error = ""

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        with self.lock:
            self.handed += len(batch)
        try:
            result = self.inner.export(batch)
            error = "" if result is LogRecordExportResult.SUCCESS else "export failed"
        except Exception as exc:  # the SDK's thread would only log it; count it instead
            result, error = LogRecordExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        with self.lock:
            if error:
                self.failed += len(batch)
                self.failed_exports += 1
                self.last_error = error
            else:
                self.exported += len(batch)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class OtlpExporter:
    """Flows in (from a hub follower, on the event loop), OTLP log records out (SDK thread)."""

    def __init__(self, config: OtlpConfig, service_name: str = "ciliate-events",
                 inner: LogRecordExporter | None = None) -> None:
        self.config = config
        self.core = ExporterCore(config.export)
        self.counting = CountingExporter(inner or OTLPLogExporter(
            endpoint=config.endpoint, headers=config.headers, timeout=config.timeout))
        self.processor = BatchLogRecordProcessor(
            self.counting, max_queue_size=config.queue,
            max_export_batch_size=min(EXPORT_BATCH, config.queue))
        self.provider = LoggerProvider(resource=Resource.create({"service.name": service_name}),
                                       shutdown_on_exit=False)
        self.provider.add_log_record_processor(self.processor)
        self.logger = self.provider.get_logger("ciliate.events.flows")
        self.emitted = 0
        self.queue_dropped = 0
        self.emit_errors = 0

    def queued(self) -> int:
        """Records emitted and not yet taken by an export call (the processor's queue)."""
        with self.counting.lock:
            return self.emitted - self.counting.handed

    def emit(self, records: Sequence[Wire]) -> None:
        """Render and queue ``records``; never blocks, never raises."""
        room = self.config.queue - self.queued()
        now = time.time_ns()
        for w in records:
            try:
                rec = self.core.render_log(w)
                if rec is None:
                    continue
                if room <= 0:
                    self.queue_dropped += 1
                    continue
                self.logger.emit(timestamp=rec.time_ns or now, observed_timestamp=now,
                                 body=rec.body, attributes=rec.attributes)
            except Exception:  # a record the SDK refuses must not stop ingest or export
                self.emit_errors += 1
                log.exception("OTLP: a flow record could not be emitted")
                continue
            self.emitted += 1
            room -= 1

    def stats(self) -> dict[str, Any]:
        c = self.counting
        with c.lock:
            return {"endpoint": self.config.endpoint, "emitted": self.emitted,
                    "skipped": self.core.skipped, "exported": c.exported, "failed": c.failed,
                    "failed_exports": c.failed_exports, "last_error": c.last_error,
                    "queued": self.emitted - c.handed, "queue_dropped": self.queue_dropped,
                    "emit_errors": self.emit_errors}

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (up to ``timeout_s``) and stop the SDK's thread; blocking."""
        try:
            self.processor.force_flush(int(timeout_s * 1000))
        finally:
            self.provider.shutdown()
