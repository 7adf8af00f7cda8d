"""What a group task says in its log about VIP preemption: read when the task starts, from the record the
scheduler-side watcher keeps (:mod:`airflow_comfy.scheduling.preemption`), and when Airflow stops it."""

from __future__ import annotations

import json
from typing import Any

from airflow_comfy.scheduling.preemption import EVENTS_VARIABLE, events_about


def log_preemptions(context: Any, log: Any) -> None:
    """Log every preemption this task instance took part in: the tries of it that were interrupted (by which
    run) and the tasks it interrupted to get its slot. Best effort: a missing record says nothing."""
    ti = context.get("ti") if hasattr(context, "get") else None
    if ti is None:
        return
    try:
        from airflow.sdk import Variable

        raw = Variable.get(EVENTS_VARIABLE, default="[]")
        events = json.loads(raw) if isinstance(raw, str) else list(raw or [])
    except Exception:  # no record yet, or no API to read it from (a test without a task context)
        return
    for line in events_about(events, ti.dag_id, ti.run_id, ti.task_id):
        log.warning("airflow-comfy: %s", line)


STOPPED_MESSAGE = (
    "airflow-comfy: Airflow stopped this try while it was running (the task instance was cleared while "
    "running: a VIP preemption or a manual clear). The runner is stopped; the task runs again from its group's "
    "start in a new try, without using a retry, and the groups already finished are not run again.")
