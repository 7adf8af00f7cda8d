"""Airflow listener of this package (loaded through its ``airflow.plugins`` entry point, in every Airflow
process): in the scheduler it starts the VIP preemption watcher and, when Airflow's metrics are on, the queue
wait reporter (:mod:`airflow_comfy.scheduling.queue_wait`) when the scheduler job starts, and stops them before
the scheduler stops. In any other process it does nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

_watcher: Any = None
_reporter: Any = None
_lock = threading.Lock()


@hookimpl
def on_starting(component: Any) -> None:
    if type(component).__name__ != "Job":  # the task runner, the api-server ...: nothing to watch
        return
    threading.Thread(target=_start_if_scheduler, args=(component,), name="airflow-comfy-preemption-start",
                     daemon=True).start()


@hookimpl
def before_stopping(component: Any) -> None:
    global _watcher, _reporter
    with _lock:
        for thread in (_watcher, _reporter):
            if thread is not None:
                thread.stop()
        _watcher = _reporter = None


def _start_if_scheduler(component: Any) -> None:
    global _watcher
    from airflow_comfy.scheduling.preemption import PreemptionWatcher, preemption_policy, wait_for_scheduler

    if not wait_for_scheduler(component):
        return
    _start_queue_wait_reporter()
    try:
        policy = preemption_policy()
    except Exception:
        log.exception("airflow-comfy: the [comfy] preemption settings are invalid; VIP preemption is off")
        return
    if policy is None:
        log.info("airflow-comfy: VIP preemption is off ([comfy] preemption)")
        return
    with _lock:
        if _watcher is None:
            _watcher = PreemptionWatcher(policy)
            _watcher.start()


def _start_queue_wait_reporter() -> None:
    global _reporter
    from airflow_comfy.scheduling.queue_wait import QueueWaitReporter, metrics_on

    try:
        if not metrics_on():
            return
        from airflow_comfy.config import get_settings

        tiers = get_settings().tier_weights
    except Exception:
        log.exception("airflow-comfy: cannot send comfy.group.queue_wait (the settings are invalid)")
        return
    with _lock:
        if _reporter is None:
            _reporter = QueueWaitReporter(tiers)
            _reporter.start()
