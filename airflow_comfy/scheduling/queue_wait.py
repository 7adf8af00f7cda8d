"""The ``comfy.group.queue_wait`` metric: how long each group task waited between being ready to run and
starting, its pool's wait included.

Why the scheduler sends it: a task never learns when it became ready (the task SDK gives it its start, not the
times the scheduler recorded), and the wait that matters for GPU pools is spent in ``scheduled``, before the
task is queued (Airflow's own ``task.queued_duration`` covers only queued -> running). The scheduler's
database has both: :class:`QueueWaitReporter`, a thread started in the scheduler by this package's listener
when Airflow's metrics are on, looks every ``poll_seconds`` for group task instances that started since its
last look and sends ``start_date - scheduled_dttm`` (``queued_dttm`` when there is no scheduled time) as a
timer, tagged with the DAG, the task, its tier (from its priority weight) and its pool.

Each look takes the group task instances that started in the last ``lookback_seconds`` and sends those it has not
sent yet (a task's start time is the worker's, and reaches the database a while later on a busy worker, so a
time window alone would miss some). Starts that happened before the scheduler started are not sent; with several
schedulers each one sends it (a wait is counted once per scheduler).
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


def started_groups(session: Any, since: datetime) -> list[Any]:
    """Rows (id, try_number, dag_id, task_id, pool, priority_weight, scheduled_dttm, queued_dttm, start_date) of
    the group task instances that started at or after ``since``."""
    from airflow.models.taskinstance import TaskInstance as TI
    from sqlalchemy import select

    return list(session.execute(
        select(TI.id, TI.try_number, TI.dag_id, TI.task_id, TI.pool, TI.priority_weight, TI.scheduled_dttm,
               TI.queued_dttm, TI.start_date)
        .where(TI.operator.in_(GROUP_OPERATORS), TI.start_date >= since)
    ).all())


def send_queue_wait(row: Any, tiers: dict[str, int]) -> bool:
    """Send one task instance's queue wait; False when its times are unknown."""
    from airflow_comfy.metrics import QUEUE_WAIT, group_tags, scheduler_stats, send_timing
    from airflow_comfy.scheduling.tiers import tier_of_weight

    seconds = queue_wait_seconds(row.scheduled_dttm or row.queued_dttm, row.start_date)
    if seconds is None:
        return False
    tags = group_tags(row.dag_id, row.task_id, tier_of_weight(row.priority_weight or 0, tiers), row.pool)
    send_timing(QUEUE_WAIT, seconds, tags, stats=scheduler_stats())
    return True


class QueueWaitReporter(threading.Thread):
    """The scheduler-side loop (see the module docstring)."""

    def __init__(self, tiers: dict[str, int], poll_seconds: float = 5.0, lookback_seconds: float = 600.0):
        super().__init__(name="airflow-comfy-queue-wait", daemon=True)
        self.tiers = dict(tiers)
        self.poll_seconds = poll_seconds
        self.lookback = timedelta(seconds=lookback_seconds)
        self.started_at = datetime.now(timezone.utc)
        self.seen: dict[tuple[Any, int], datetime] = {}
        """(task instance id, try) -> its start, of the starts already looked at."""
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

    def tick(self, now: datetime | None = None) -> int:
        """Send the queue wait of the group task instances that started since the last look; how many. Starts
        from before this reporter began are only noted (sent by the scheduler before, or lost)."""
        from airflow.utils.session import create_session

        since = (now or datetime.now(timezone.utc)) - self.lookback
        with create_session() as session:
            rows = started_groups(session, since)
        seen = {key: at for key, at in self.seen.items() if at >= since}
        sent = 0
        for row in rows:
            key = (row.id, row.try_number)
            if key in seen:
                continue
            seen[key] = row.start_date
            if row.start_date >= self.started_at and send_queue_wait(row, self.tiers):
                sent += 1
        self.seen = seen
        if sent:
            log.info("airflow-comfy: sent the queue wait of %d group task(s)", sent)
        return sent
