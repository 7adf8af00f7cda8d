"""Bounded waiting for every artifact store operation.

Each operation (a read, a write, a listing, a copy, a delete) runs under :class:`StoreLimits`:

* ``connect`` / ``read``: seconds one network attempt may wait to connect, and for each answer (S3);
* ``operation``: the operation's total deadline in seconds, retries and their pauses included. The caller
  gets its answer, or :class:`~airflow_comfy.artifacts.errors.StoreUnavailable`, within that time, even when
  the store stalls mid-transfer (the attempt runs in a daemon thread; a stuck one is left behind, and never
  retried);
* ``attempts``: how many times a failure that may pass (a timeout, a cut connection, HTTP 5xx, throttling) is
  tried, with pauses of 0.5 s, 1 s, 2 s ... (plus jitter, at most 4 s) between them.

The runner gets them as ``COMFY_STORE_TIMEOUTS=connect=5,read=20,operation=45,attempts=4`` (its environment,
set by the operators from ``[comfy] store_connect_timeout``, ``store_read_timeout``,
``store_operation_timeout`` and ``store_attempts``); :func:`airflow_comfy.artifacts.store.open_store` uses
that variable's value, else the defaults here. ``operation=0`` turns the deadline off.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from airflow_comfy.artifacts.errors import StoreUnavailable

ENV = "COMFY_STORE_TIMEOUTS"
MAX_PAUSE = 4.0
_NAMES = {"connect": "connect_timeout", "read": "read_timeout", "operation": "operation_timeout",
          "attempts": "attempts"}
T = TypeVar("T")


@dataclass(frozen=True)
class StoreLimits:
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    operation_timeout: float = 45.0
    attempts: int = 4
    backoff: float = 0.5
    """The first pause between attempts, in seconds; doubled after each."""

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"store {name.replace('_', ' ')} must be a positive number of seconds")
        if self.operation_timeout < 0:
            raise ValueError("store operation timeout must not be negative (0: no deadline)")
        if self.attempts < 1:
            raise ValueError("store attempts must be at least 1")

    def to_text(self) -> str:
        """``connect=5,read=20,operation=45,attempts=4``: the value of :data:`ENV`."""
        return ",".join(f"{short}={getattr(self, name):g}" for short, name in _NAMES.items())

    @classmethod
    def parse(cls, text: str) -> StoreLimits:
        """From ``connect=5,read=20,operation=45,attempts=4`` (any subset; the rest keep their defaults)."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            short, sep, raw = item.partition("=")
            if not sep or short.strip() not in _NAMES:
                raise ValueError(f"{ENV}: expected name=value with a name among {', '.join(_NAMES)}, got {item!r}")
            name = _NAMES[short.strip()]
            try:
                values[name] = int(raw) if name == "attempts" else float(raw)
            except ValueError:
                raise ValueError(f"{ENV}: {short.strip()} must be a number, got {raw!r}") from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StoreLimits:
        text = (os.environ if environ is None else environ).get(ENV, "")
        return cls.parse(text) if text.strip() else cls()

    def with_values(self, **values: Any) -> StoreLimits:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return StoreLimits(**(current | values))


class Transient(Exception):
    """Raised by a store's attempt for a failure that may pass; ``detail`` says what happened."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    attempts: int = 0
    last: str = ""


def bounded(call: Callable[[], T], limits: StoreLimits, action: str, uri: str) -> T:
    """``call()`` under ``limits``: retried while it raises :class:`Transient`, given up with
    :class:`StoreUnavailable` (``cannot <action> <uri>: ...``) when the attempts or the deadline are spent. Any
    other exception is raised as it is, at once."""
    what = f"{action} {uri}"
    if limits.operation_timeout <= 0:
        return _attempts(call, limits, float("inf"), threading.Event(), _Outcome(), what, uri)
    outcome, stop, done = _Outcome(), threading.Event(), threading.Event()
    deadline = time.monotonic() + limits.operation_timeout

    def work() -> None:
        try:
            outcome.value = _attempts(call, limits, deadline, stop, outcome, what, uri)
        except BaseException as exc:  # handed to the waiting thread
            outcome.error = exc
        finally:
            done.set()

    threading.Thread(target=work, name=f"store: {what[:80]}", daemon=True).start()
    if not done.wait(limits.operation_timeout):
        stop.set()
        last = f"; last: {outcome.last}" if outcome.last else ""
        raise StoreUnavailable(
            f"cannot {what}: no answer within {limits.operation_timeout:g} s "
            f"({max(outcome.attempts, 1)} attempt(s), connect/read timeouts {limits.connect_timeout:g}/"
            f"{limits.read_timeout:g} s{last})", uri=uri)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def _attempts(call: Callable[[], T], limits: StoreLimits, deadline: float, stop: threading.Event,
              outcome: _Outcome, what: str, uri: str) -> T:
    started = time.monotonic()
    for attempt in range(1, limits.attempts + 1):
        outcome.attempts = attempt
        try:
            return call()
        except Transient as exc:
            outcome.last = exc.detail
            pause = min(limits.backoff * 2 ** (attempt - 1), MAX_PAUSE) * (1 + random.random() / 4)
            if attempt == limits.attempts or time.monotonic() + pause >= deadline or stop.is_set():
                break
            if stop.wait(pause):
                break
    raise StoreUnavailable(
        f"cannot {what}: gave up after {outcome.attempts} attempt(s) in {time.monotonic() - started:.1f} s: "
        f"{outcome.last}", uri=uri)
