"""Runs one service: flags and environment, NATS, SQL, HTTP, heartbeat, graceful shutdown."""

from ciliate.runner.context import ServiceContext, ServiceSpec
from ciliate.runner.main import main, run_service

__all__ = ["ServiceContext", "ServiceSpec", "main", "run_service"]
