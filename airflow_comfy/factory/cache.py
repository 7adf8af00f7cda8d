"""Parse cache: compiled workflows keyed by what they depend on (path, bytes, sidecar, catalog, version).

The dag-processor re-parses the loader file every loop, often in a fresh process, so the cache lives on disk
(one JSON file per key) with an in-process layer in front. Writes are atomic (temp file + rename); an
unreadable or corrupt entry is treated as a miss, never as an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

_MEMORY: dict[str, dict[str, Any]] = {}
_MEMORY_LIMIT = 512


class CompileCache:
    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None

    def get(self, key: str) -> dict[str, Any] | None:
        if key in _MEMORY:
            return _MEMORY[key]
        if self.directory is None:
            return None
        try:
            data = json.loads((self.directory / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        self._remember(key, data)
        return data

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._remember(key, value)
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(value, handle, separators=(",", ":"))
            os.replace(tmp, self.directory / f"{key}.json")
        except OSError:
            pass  # a read-only or full disk only costs speed

    @staticmethod
    def _remember(key: str, value: dict[str, Any]) -> None:
        if len(_MEMORY) >= _MEMORY_LIMIT:
            _MEMORY.pop(next(iter(_MEMORY)))
        _MEMORY[key] = value


def clear_memory() -> None:
    _MEMORY.clear()
