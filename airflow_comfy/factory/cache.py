"""Parse cache: what loading a workflow file found, keyed by everything that result depends on.

The dag-processor parses the two stub files every loop, each in a fresh process, so the cache lives on disk,
one folder per workflows folder (``<cache_dir>/<hash of the folder path>/``), with an in-process layer in
front. For each key (see :func:`airflow_comfy.factory.compile.cache_key`) it keeps

* ``<key>.json``: the compiled workflow (what slicing made; the DAG is rebuilt from it), and
* ``<key>.verdict.json``: whether the file became a DAG (``{"ok": true}``) or why not
  (``{"problems": [...]}``), written by whichever stub loaded the file first. The error stub reads only
  verdicts, so reporting the bad files of a folder costs a hash per file once the folder has been seen.

Writes are atomic (temp file + rename); an unreadable or corrupt entry is a miss, never an error. Entries of
keys the folder no longer uses (edited or removed files) are removed by :meth:`ParseCache.prune`, so the cache
holds one entry per current file.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from airflow_comfy.workflow.errors import Problem, WorkflowError

_MEMORY: dict[str, dict[str, Any]] = {}
_MEMORY_LIMIT = 512
_COUNTER = itertools.count()
COMPILED_SUFFIX = ".json"
VERDICT_SUFFIX = ".verdict.json"
#: A temp file older than this is left over from a writer that died; prune removes it.
STALE_TEMP_SECONDS = 600


class ParseCache:
    """The cache of one workflows folder. ``directory`` None or empty: memory only."""

    def __init__(self, directory: str | os.PathLike | None, folder: str | os.PathLike):
        folder_id = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
        self.root = Path(directory) / folder_id if directory else None

    # --- compiled workflows -----------------------------------------------------------------------------
    def compiled(self, key: str) -> dict[str, Any] | None:
        if key in _MEMORY:
            return _MEMORY[key]
        data = self._read(key + COMPILED_SUFFIX)
        if data is not None:
            _remember(key, data)
        return data

    def put_compiled(self, key: str, value: dict[str, Any]) -> None:
        _remember(key, value)
        self._write(key + COMPILED_SUFFIX, value)

    # --- verdicts -------------------------------------------------------------------------------------------
    def verdict(self, key: str) -> WorkflowError | bool | None:
        """True: the file became a DAG; a WorkflowError: why it did not; None: not known yet."""
        data = self._read(key + VERDICT_SUFFIX)
        if not isinstance(data, dict):
            return None
        if data.get("ok") is True:
            return True
        try:
            return WorkflowError([Problem(**p) for p in data["problems"]])
        except (KeyError, TypeError, ValueError):
            return None

    def has_verdict(self, key: str) -> bool:
        return self.root is not None and os.path.exists(self.root / (key + VERDICT_SUFFIX))

    def put_verdict(self, key: str, verdict: WorkflowError | bool) -> None:
        if verdict is True:
            self._write(key + VERDICT_SUFFIX, {"ok": True})
        elif isinstance(verdict, WorkflowError):
            self._write(key + VERDICT_SUFFIX, {"problems": [p.__dict__ for p in verdict.problems]})

    # --- housekeeping -------------------------------------------------------------------------------------
    def prune(self, used_keys: set[str]) -> int:
        """Remove the entries of keys not in ``used_keys`` (and temp files of dead writers); returns how many
        files were removed."""
        if self.root is None:
            return 0
        removed = 0
        try:
            names = os.listdir(self.root)
        except OSError:
            return 0
        now = time.time()
        for name in names:
            if name.startswith(".tmp-"):
                if not _older_than(self.root / name, now - STALE_TEMP_SECONDS):
                    continue
            elif name.split(".", 1)[0] in used_keys:
                continue
            try:
                os.unlink(self.root / name)
                removed += 1
            except OSError:
                pass
        return removed

    def _read(self, name: str) -> Any:
        if self.root is None:
            return None
        try:
            return json.loads((self.root / name).read_bytes())
        except (OSError, ValueError):
            return None

    def _write(self, name: str, value: Any) -> None:
        if self.root is None:
            return
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        tmp = self.root / f".tmp-{os.getpid()}-{next(_COUNTER)}-{name}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, self.root / name)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a read-only or full disk only costs speed


def _older_than(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime < moment
    except OSError:
        return False


def _remember(key: str, value: dict[str, Any]) -> None:
    if len(_MEMORY) >= _MEMORY_LIMIT:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = value


def clear_memory() -> None:
    _MEMORY.clear()
