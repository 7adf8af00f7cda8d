"""The runner's own deadline: ``--deadline SECONDS`` (env ``COMFY_RUNNER_DEADLINE_S``).

The operators set it a little under the task's ``execution_timeout``, so that a runner that stalls (a store
that stops answering in a way the store's own deadline cannot see, a hung driver) says so and exits with code 1
(retryable) before Airflow kills it without a word. Past the deadline a watchdog thread prints the failure line
(:mod:`airflow_comfy.runner.failure`), naming the node that was running, and ends the process at once: what
the try wrote stays uncommitted, for the next try to clean.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from airflow_comfy.runner.failure import FAILED, report
from airflow_comfy.workflow.groupspec import EXIT_INFRASTRUCTURE, RUNNER_DEADLINE_ENV

ENV = RUNNER_DEADLINE_ENV


def start_watchdog(seconds: float | None, doing: Callable[[], str | None]) -> threading.Timer | None:
    """After ``seconds``: report what ``doing()`` says was going on, and exit with code 1. None: no deadline."""
    if not seconds:
        return None

    def expire() -> None:
        what = doing()
        report(FAILED, f"the runner passed its deadline of {seconds:g} s ({ENV} / --deadline, set from the task's "
                       f"execution_timeout){f' while {what} ran' if what else ''}")
        os._exit(EXIT_INFRASTRUCTURE)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer
