"""Events to size-rotated JSON-lines files, filtered by allow/deny lists (Tetragon's exporter).

Configured from the environment (Tetragon's flag names, upper-cased under CILIATE_):
``CILIATE_EXPORT_FILE`` (path; unset = no export), ``CILIATE_EXPORT_FILE_MAX_SIZE_MB`` (10),
``CILIATE_EXPORT_FILE_MAX_BACKUPS`` (5), ``CILIATE_EXPORT_ALLOWLIST`` and
``CILIATE_EXPORT_DENYLIST`` (one JSON filter object per line). When the file would grow past the
size it is renamed to ``<file>.1`` (older backups shift to ``.2`` ...; the oldest is removed).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from services.security.core.filters import AllowDeny, parse_filter_lines

DEFAULT_MAX_SIZE_MB = 10
DEFAULT_MAX_BACKUPS = 5


class Exporter:
    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_SIZE_MB * 1024 * 1024,
                 max_backups: int = DEFAULT_MAX_BACKUPS,
                 filters: AllowDeny | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.filters = filters or AllowDeny()
        self.written = 0
        self.filtered = 0
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - long-lived
        self._size = self._file.tell()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Exporter | None:
        path = env.get("CILIATE_EXPORT_FILE")
        if not path:
            return None
        filters = AllowDeny(
            allow=parse_filter_lines(env.get("CILIATE_EXPORT_ALLOWLIST", "")),
            deny=parse_filter_lines(env.get("CILIATE_EXPORT_DENYLIST", "")),
        )
        size_mb = float(env.get("CILIATE_EXPORT_FILE_MAX_SIZE_MB", str(DEFAULT_MAX_SIZE_MB)))
        return cls(Path(path), max_bytes=int(size_mb * 1024 * 1024),
                   max_backups=int(env.get("CILIATE_EXPORT_FILE_MAX_BACKUPS",
                                           str(DEFAULT_MAX_BACKUPS))),
                   filters=filters)

    def write(self, event: Mapping[str, Any]) -> bool:
        """Append one event if the filters let it through; returns whether it was written."""
        if not self.filters.passes(event):
            self.filtered += 1
            return False
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n"
        size = len(line.encode())
        with self._lock:
            if self._size and self._size + size > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += size
            self.written += 1
        return True

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        if self.max_backups <= 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest = self.backup(self.max_backups)
            oldest.unlink(missing_ok=True)
            for n in range(self.max_backups - 1, 0, -1):
                if self.backup(n).exists():
                    os.replace(self.backup(n), self.backup(n + 1))
            os.replace(self.path, self.backup(1))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._size = 0

    def backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def close(self) -> None:
        with self._lock:
            self._file.close()
