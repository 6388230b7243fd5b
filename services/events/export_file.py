"""Size-rotated flow-log files for the exporter (file I/O only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO


class RotatingFile:
    """Append lines to ``path``; past ``max_bytes`` rotate to ``path.1`` … ``path.<backups>``."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5) -> None:
        if max_bytes < 1 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    def write(self, line: str) -> None:
        size = len(line.encode())
        if self._size and self._size + size > self.max_bytes:
            self.rotate()
        self._fh.write(line)
        self._size += size

    def flush(self) -> None:
        self._fh.flush()

    def rotate(self) -> None:
        self._fh.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.path.exists():
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._fh = self.path.open("a", encoding="utf-8")
        self._size = 0

    def close(self) -> None:
        self._fh.close()
