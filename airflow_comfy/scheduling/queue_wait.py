"""The ``comfy.group.queue_wait`` metric: how long each group task waited between being ready to run and
starting, its pool's wait included.

Why the scheduler sends it: a task never learns when it became ready (the task SDK gives it its start, not the
times the scheduler recorded), and the wait that matters for GPU pools is spent in ``scheduled``, before the
task is queued (Airflow's own ``task.queued_duration`` covers only queued -> running). The scheduler's
database has both: :class:`QueueWaitReporter`, a thread started in the scheduler by this package's listener
when Airflow's metrics are on, looks every ``poll_seconds`` for group task instances that started since its
last look and sends ``start_date - scheduled_dttm`` (``queued_dttm`` when there is no scheduled time) as a
timer, tagged with the DAG, the task, its tier (from its priority weight) and its pool.

It looks at starts up to ``settle_seconds`` ago, so that a start written a little late is still seen once.
With several schedulers each one sends it (a wait is counted once per scheduler).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

log = logging.getLogger(__name__)

#: The operators whose task instances are groups.
GROUP_OPERATORS = ("ComfyGroupLocalOperator", "ComfyGroupPodOperator")


def metrics_on() -> bool:
    """Whether Airflow sends metrics at all (StatsD, Datadog or OpenTelemetry)."""
    from airflow.configuration import conf

    return any(conf.getboolean("metrics", name, fallback=False)
               for name in ("statsd_on", "statsd_datadog_enabled", "otel_on"))


def queue_wait_seconds(ready: datetime | None, started: datetime | None) -> float | None:
    """Seconds from ``ready`` to ``started`` (never negative); None when either is unknown."""
    if ready is None or started is None:
        return None
    return max(0.0, (started - ready).total_seconds())


def report_started(session: Any, since: datetime, until: datetime, tiers: dict[str, int]) -> int:
    """Send the queue wait of every group task instance that started in ``[since, until)``; how many."""
    from airflow.models.taskinstance import TaskInstance as TI
    from sqlalchemy import select

    from airflow_comfy.metrics import QUEUE_WAIT, group_tags, scheduler_stats, send_timing
    from airflow_comfy.scheduling.tiers import tier_of_weight

    rows = session.execute(
        select(TI.dag_id, TI.task_id, TI.pool, TI.priority_weight, TI.scheduled_dttm, TI.queued_dttm,
               TI.start_date)
        .where(TI.operator.in_(GROUP_OPERATORS), TI.start_date >= since, TI.start_date < until)
    ).all()
    sent = 0
    for row in rows:
        seconds = queue_wait_seconds(row.scheduled_dttm or row.queued_dttm, row.start_date)
        if seconds is None:
            continue
        tags = group_tags(row.dag_id, row.task_id, tier_of_weight(row.priority_weight or 0, tiers), row.pool)
        send_timing(QUEUE_WAIT, seconds, tags, stats=scheduler_stats())
        sent += 1
    return sent


class QueueWaitReporter(threading.Thread):
    """The scheduler-side loop (see the module docstring)."""

    def __init__(self, tiers: dict[str, int], poll_seconds: float = 5.0, settle_seconds: float = 5.0):
        super().__init__(name="airflow-comfy-queue-wait", daemon=True)
        self.tiers = dict(tiers)
        self.poll_seconds = poll_seconds
        self.settle = timedelta(seconds=settle_seconds)
        self.since = datetime.now(timezone.utc) - self.settle
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        log.info("airflow-comfy: sending comfy.group.queue_wait every %.0f s", self.poll_seconds)
        while not self._stop_event.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception:  # never take the scheduler down; the next tick looks again
                log.exception("airflow-comfy: queue wait tick failed")

    def tick(self) -> int:
        from airflow.utils.session import create_session

        until = datetime.now(timezone.utc) - self.settle
        with create_session() as session:
            sent = report_started(session, self.since, until, self.tiers)
        self.since = until
        return sent
