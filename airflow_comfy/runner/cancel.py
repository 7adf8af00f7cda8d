"""Cancelling the job of a runner service (:mod:`airflow_comfy.runner.service`) between nodes or sampler steps.

The service sets the flag when the task that sent the job goes away or asks it to stop; the executor checks it
before each node and the sampler's progress callback after each step, and :class:`JobCancelled` unwinds the
job. A runner subprocess never sets it (a cancelled subprocess is killed instead), so there the checks cost a
flag read and nothing else.
"""

from __future__ import annotations

import threading

_REQUESTED = threading.Event()


class JobCancelled(BaseException):
    """The job was cancelled. A ``BaseException``, like ``KeyboardInterrupt``: the runner's ``except Exception``
    handlers (bad input, infrastructure, out of memory) must not turn it into an ordinary failure."""


def request() -> None:
    _REQUESTED.set()


def clear() -> None:
    _REQUESTED.clear()


def requested() -> bool:
    return _REQUESTED.is_set()


def check() -> None:
    """Raise :class:`JobCancelled` when the job was cancelled."""
    if _REQUESTED.is_set():
        raise JobCancelled("the job was cancelled")
