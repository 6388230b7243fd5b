"""The client context file (``context.json`` in the state dir, mode 0600): URLs and token."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciliate.config import state_dir_from_env

CONTEXT_FILE = "context.json"


class ContextMissing(RuntimeError):
    """No running stack was found where the CLI looked."""


@dataclass
class ClientContext:
    state_dir: str
    nats_url: str
    token: str
    db_url: str = ""
    services: dict[str, list[str]] = field(default_factory=dict)
    nats_user: str | None = None
    nats_password: str | None = None
    nodes: list[str] = field(default_factory=list)
    pid: int = 0

    @classmethod
    def path_for(cls, state_dir: Path | None = None) -> Path:
        return (state_dir or state_dir_from_env()) / CONTEXT_FILE

    @classmethod
    def load(cls, state_dir: Path | None = None) -> ClientContext:
        path = cls.path_for(state_dir)
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ContextMissing(
                f"no running stack: {path} does not exist (start one with `ciliate up`, or set "
                "CILIATE_STATE_DIR to its state directory)"
            ) from None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self) -> Path:
        path = self.path_for(Path(self.state_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        return path

    def urls(self, service: str) -> list[str]:
        return list(self.services.get(service, []))
