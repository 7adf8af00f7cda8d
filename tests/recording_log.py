"""A stand-in for an operator's task logger in tests that run an operator's ``execute`` in this process: it keeps
each message, formatted, so a test can read what the task would have logged."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    """Stands in for the task logger: keeps each message, formatted."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _add(self, message: str, *args: Any, **_: Any) -> None:
        self.lines.append(message % args if args else message)

    info = warning = error = debug = exception = _add

    def text(self) -> str:
        return "\n".join(self.lines)
