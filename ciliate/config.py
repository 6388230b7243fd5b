"""Settings shared by every process, from flags and ``CILIATE_*`` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_STATE_DIR = Path.home() / ".local" / "state" / "ciliate"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def state_dir_from_env() -> Path:
    return Path(os.environ.get("CILIATE_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class Settings:
    nats_url: str = DEFAULT_NATS_URL
    nats_user: str | None = None
    nats_password: str | None = None
    db_url: str = ""
    token: str = ""
    node: str = field(default_factory=socket.gethostname)
    state_dir: Path = DEFAULT_STATE_DIR
    http_host: str = "127.0.0.1"
    http_port: int = 0
    replica: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    dev_mode: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        state_dir = Path(e.get("CILIATE_STATE_DIR") or DEFAULT_STATE_DIR)
        return cls(
            nats_url=e.get("CILIATE_NATS_URL", DEFAULT_NATS_URL),
            nats_user=e.get("CILIATE_NATS_USER") or None,
            nats_password=e.get("CILIATE_NATS_PASSWORD") or None,
            db_url=e.get("CILIATE_DB_URL") or f"sqlite+aiosqlite:///{state_dir / 'ciliate.db'}",
            token=e.get("CILIATE_TOKEN", ""),
            node=e.get("CILIATE_NODE") or socket.gethostname(),
            state_dir=state_dir,
            http_host=e.get("CILIATE_HTTP_HOST", "127.0.0.1"),
            http_port=int(e.get("CILIATE_HTTP_PORT", "0") or 0),
            replica=e.get("CILIATE_REPLICA", ""),
            log_format=e.get("CILIATE_LOG_FORMAT", "text"),
            log_level=e.get("CILIATE_LOG_LEVEL", "INFO"),
            dev_mode=e.get("CILIATE_DEV_MODE", "") in ("1", "true", "yes"),
        )

    def with_overrides(self, **changes: object) -> Settings:
        clean = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **clean)  # type: ignore[arg-type]
