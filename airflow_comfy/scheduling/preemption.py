"""VIP preemption: a VIP task that waits too long for a slot of its pool takes one from a lower-tier task.

Airflow orders the queue by priority weight but never interrupts a running task: with minute-long sampling
tasks, a VIP run that finds its GPU pool full waits until one of them ends. This module closes that gap with
Airflow's own mechanism for stopping a running task so that it runs again later: clearing it
(``clear_task_instances``). A running task instance that is cleared goes to ``restarting``; its worker
terminates it (the operators stop the runner subprocess or delete the pod), Airflow counts it as eligible for
another try without using up its retries, and the scheduler queues it again. A ``restarting`` task no longer
holds its pool slot, so the VIP task is queued at the scheduler's next loop. The interrupted group runs again
from its start under a new try number (artifacts are per try, so nothing of the stopped try is read), and the
groups its run had already finished are not touched.

Who watches: the scheduler itself. :class:`PreemptionWatcher` is a thread started in the scheduler process by
this package's listener (``on_starting`` of the scheduler job, through the ``airflow.plugins`` entry point),
with a database session of its own, polling every ``poll_seconds``. The triggerer was the other candidate,
but in Airflow 3 triggers run without database access and clearing a task instance needs it; a deferrable
"guard" task would take a worker slot and API credentials. The scheduler already owns the queue and the
database. With several schedulers, a PostgreSQL advisory lock lets one watcher act per tick.

The rule, each tick:

* A task instance *waits* when it is ``scheduled`` (ready, not queued), its weight is at least the VIP
  tier's, it became ready more than ``preempt_after`` seconds ago, and its pool has no open slot for it.
* For each waiting one (oldest first), the *victim* is the running task instance in the same pool with the
  lowest weight below the VIP tier, the most recently started first, that has been preempted fewer than
  ``max_preemptions`` times (the starvation guard), and that frees enough slots.
* The victim is cleared; both task instances get a note (shown in the UI) and the event is appended to the
  Airflow Variable ``airflow_comfy_preemptions`` (the last 200), which the tasks read to say in their logs
  what happened ("preempted by run X of DAG Y" / "preempted task Z").
* The victim keeps its place: its weight goes up by one within its tier (never to the next tier's weight), so
  when a slot frees it runs before the tasks of its tier that never ran. Without that it would queue behind
  them: at equal weight Airflow orders by the run's logical date, and triggered runs have none.
* A VIP run that Airflow holds ``queued`` because its DAG already has ``max_active_runs`` runs running is
  started at once (its tasks exist, with the VIP weight, from the moment it was triggered): a run's place in
  ``max_active_runs`` is not a GPU, and the pools still bound what runs. The run gets a note saying so.

No torch, no runner: this runs in the scheduler.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

log = logging.getLogger(__name__)

EVENTS_VARIABLE = "airflow_comfy_preemptions"
MAX_EVENTS = 200
NOTE_PREFIX = "airflow-comfy: preempted "
_NOTE_COUNT = re.compile(r"^airflow-comfy: preempted (\d+) time")
#: PostgreSQL advisory lock key of the watcher ("comfy" in ASCII), so that one scheduler acts per tick.
ADVISORY_LOCK_KEY = 0x636F6D6679


@dataclass(frozen=True)
class PreemptionPolicy:
    vip_weight: int
    """Task instances at or above this weight may preempt; those below may be preempted."""
    preempt_after: float = 5.0
    """Seconds a VIP task instance waits for a slot before a lower-tier task is interrupted."""
    max_preemptions: int = 2
    """A task instance preempted this many times is never preempted again (starvation guard)."""
    poll_seconds: float = 1.0
    tier_weights: tuple[int, ...] = ()
    """The weights of the configured tiers: a preempted task's weight goes up within its tier, never to the
    next tier's weight."""

    tier_names: tuple[tuple[int, str], ...] = ()
    """(weight, tier name) of the configured tiers: what the preemption metric calls a task's tier."""

    def tier_of(self, weight: int) -> str:
        """The tier of a task of ``weight``: the one with the highest weight not above it ("none" below all)."""
        from airflow_comfy.scheduling.tiers import tier_of_weight

        return tier_of_weight(weight, {name: w for w, name in self.tier_names})

    def resume_weight(self, weight: int) -> int:
        """The weight of a task preempted at ``weight``: one more, while that stays below the next tier."""
        ceiling = min((w for w in (*self.tier_weights, self.vip_weight) if w > weight), default=None)
        return weight + 1 if ceiling is None or weight + 1 < ceiling else weight


@dataclass(frozen=True)
class TaskRef:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    try_number: int = 0

    @classmethod
    def of(cls, ti: Any) -> TaskRef:
        return cls(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.try_number)

    def __str__(self) -> str:
        return f"task {self.task_id} of run {self.run_id} of DAG {self.dag_id}"


@dataclass(frozen=True)
class Preemption:
    victim: TaskRef
    by: TaskRef
    pool: str
    at: str
    count: int
    """How many times the victim has been preempted, this time included."""
    tier: str = ""
    """The victim's tier ("" in events recorded before this field)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preemption:
        return cls(victim=TaskRef(**data["victim"]), by=TaskRef(**data["by"]), pool=data["pool"], at=data["at"],
                   count=int(data["count"]), tier=str(data.get("tier", "")))


def preemption_count(note: str | None) -> int:
    """How many times a task instance was preempted, from the note this module keeps on it."""
    match = _NOTE_COUNT.match(note or "")
    return int(match.group(1)) if match else 0


def run_tick(session: Any, policy: PreemptionPolicy, now: datetime | None = None) -> list[Preemption]:
    """One look at the queue: preempt where the rule says so. Returns what was done (already flushed; the
    caller commits)."""
    from airflow.models.pool import Pool
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    now = now or datetime.now(timezone.utc)
    start_held_vip_runs(session, policy, now)
    cutoff = now - timedelta(seconds=policy.preempt_after)
    waiting = session.scalars(
        select(TaskInstance)
        .where(TaskInstance.state == TaskInstanceState.SCHEDULED,
               TaskInstance.priority_weight >= policy.vip_weight,
               TaskInstance.scheduled_dttm <= cutoff)
        .order_by(TaskInstance.scheduled_dttm)
    ).all()
    done: list[Preemption] = []
    freed: dict[str, int] = {}
    for ti in waiting:
        pool = Pool.get_pool(ti.pool, session=session)
        if pool is None:
            continue
        open_slots = pool.open_slots(session=session) + freed.get(ti.pool, 0)
        if open_slots >= ti.pool_slots:
            continue  # a slot is free (or being freed): the scheduler queues it at its next loop
        victim = _choose_victim(session, ti, policy, needed=ti.pool_slots - max(0, int(open_slots)))
        if victim is None:
            continue
        done.append(_preempt(session, victim, ti, now, policy))
        freed[ti.pool] = freed.get(ti.pool, 0) + victim.pool_slots
    if done:
        _record(session, done)
    return done


def _choose_victim(session: Any, waiting: Any, policy: PreemptionPolicy, needed: int) -> Any:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    running = session.scalars(
        select(TaskInstance)
        .where(TaskInstance.state == TaskInstanceState.RUNNING,
               TaskInstance.pool == waiting.pool,
               TaskInstance.priority_weight < policy.vip_weight)
        .order_by(TaskInstance.priority_weight, TaskInstance.start_date.desc())
    ).all()
    for ti in running:
        if preemption_count(ti.note) >= policy.max_preemptions:
            continue
        if ti.pool_slots >= needed:
            return ti
    return None


def _preempt(session: Any, victim: Any, waiting: Any, now: datetime, policy: PreemptionPolicy) -> Preemption:
    from airflow.models.taskinstance import clear_task_instances

    event = Preemption(victim=TaskRef.of(victim), by=TaskRef.of(waiting), pool=victim.pool, at=now.isoformat(),
                       count=preemption_count(victim.note) + 1, tier=policy.tier_of(victim.priority_weight or 0))
    log.warning("airflow-comfy: preempting %s (pool %s) for %s", event.victim, event.pool, event.by)
    clear_task_instances([victim], session, dag_run_state=False)
    # A running task instance that is cleared keeps its weight through ``restarting`` and its next try (Airflow
    # refreshes the weight only of task instances that were not running): one more puts it first in its tier.
    victim.priority_weight = policy.resume_weight(victim.priority_weight or 0)
    victim.note = (f"{NOTE_PREFIX}{event.count} time(s); last by run {event.by.run_id} of DAG {event.by.dag_id} "
                   f"(task {event.by.task_id}, pool {event.pool}) at {event.at}")
    waiting.note = (f"airflow-comfy: took a slot of pool {event.pool} by preempting {event.victim} "
                    f"at {event.at}")
    session.flush()
    return event


def start_held_vip_runs(session: Any, policy: PreemptionPolicy, now: datetime) -> list[Any]:
    """Start the VIP runs that Airflow holds ``queued`` only because their DAG has ``max_active_runs`` runs
    running: what the scheduler does to a queued run it lets start (``DagRun.set_state(RUNNING)``), done for
    runs with a task at the VIP weight. Runs of paused or stale DAGs, backfills and runs not due yet are left
    alone, as are runs held by nothing but the scheduler's next loop. Returns the runs started."""
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import DagRunState
    from sqlalchemy import and_, exists, false, func, select

    vip_task = exists().where(TaskInstance.dag_id == DagRun.dag_id, TaskInstance.run_id == DagRun.run_id,
                              TaskInstance.priority_weight >= policy.vip_weight)
    held = session.execute(
        select(DagRun, DagModel.max_active_runs)
        .join(DagModel, and_(DagModel.dag_id == DagRun.dag_id, DagModel.is_paused == false(),
                             DagModel.is_stale == false()))
        .where(DagRun.state == DagRunState.QUEUED, DagRun.backfill_id.is_(None), DagRun.run_after <= now,
               vip_task)
        .order_by(DagRun.queued_at)
    ).all()
    if not held:
        return []
    running = dict(session.execute(
        select(DagRun.dag_id, func.count(DagRun.id))
        .where(DagRun.state == DagRunState.RUNNING, DagRun.backfill_id.is_(None),
               DagRun.dag_id.in_({run.dag_id for run, _ in held}))
        .group_by(DagRun.dag_id)).all())
    started = []
    for run, max_active_runs in held:
        if not max_active_runs or running.get(run.dag_id, 0) < max_active_runs:
            continue  # not held by max_active_runs: the scheduler starts it at its next loop
        log.warning("airflow-comfy: starting VIP run %s of DAG %s, which max_active_runs (%d, all running) "
                    "held queued", run.run_id, run.dag_id, max_active_runs)
        run.set_state(DagRunState.RUNNING)
        if not run.note:
            run.note = (f"airflow-comfy: started at {now.isoformat()} ahead of max_active_runs ({max_active_runs} "
                        "runs were running): VIP runs never wait for a place among the DAG's active runs")
        running[run.dag_id] = running.get(run.dag_id, 0) + 1
        started.append(run)
    if started:
        session.flush()
    return started


def _record(session: Any, events: list[Preemption]) -> None:
    from airflow.models.variable import Variable

    try:
        current = json.loads(Variable.get(EVENTS_VARIABLE, default_var="[]"))
    except (ValueError, TypeError):
        current = []
    current = [*current, *(e.to_dict() for e in events)][-MAX_EVENTS:]
    Variable.set(EVENTS_VARIABLE, json.dumps(current), description="airflow-comfy: the last VIP preemptions",
                 session=session)


def events_about(events: list[dict[str, Any]], dag_id: str, run_id: str, task_id: str) -> list[str]:
    """Log lines for a task about to run: the times it was preempted and the tasks it preempted."""
    lines = []
    for raw in events:
        try:
            event = Preemption.from_dict(raw)
        except (KeyError, TypeError, ValueError):
            continue
        if (event.victim.dag_id, event.victim.run_id, event.victim.task_id) == (dag_id, run_id, task_id):
            lines.append(f"preempted by run {event.by.run_id} of DAG {event.by.dag_id} (task {event.by.task_id}, "
                         f"pool {event.pool}) at {event.at}, during try {event.victim.try_number}; this try "
                         "runs the group again from its start")
        if (event.by.dag_id, event.by.run_id, event.by.task_id) == (dag_id, run_id, task_id):
            lines.append(f"preempted {event.victim} (try {event.victim.try_number}, pool {event.pool}) "
                         f"at {event.at} to get a slot")
    return lines


class PreemptionWatcher(threading.Thread):
    """The scheduler-side loop: :func:`run_tick` every ``policy.poll_seconds``, each in its own transaction."""

    def __init__(self, policy: PreemptionPolicy):
        super().__init__(name="airflow-comfy-preemption", daemon=True)
        self.policy = policy
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        log.info("airflow-comfy: VIP preemption watcher started (vip weight >= %d, after %.1f s, at most %d "
                 "preemptions per task)", self.policy.vip_weight, self.policy.preempt_after,
                 self.policy.max_preemptions)
        while not self._stop_event.wait(self.policy.poll_seconds):
            try:
                self.tick()
            except Exception:  # never take the scheduler down; try again next tick
                log.exception("airflow-comfy: preemption tick failed")

    def tick(self) -> list[Preemption]:
        from airflow.utils.session import create_session

        with create_session() as session:
            if not _take_lock(session):
                return []
            done = run_tick(session, self.policy)
        for event in done:  # committed
            count_preemption(event)
        return done


def count_preemption(event: Preemption) -> None:
    """The ``comfy.preemptions`` counter, tagged with the preempted task's DAG, task, tier and pool. Never
    raises."""
    try:
        from airflow_comfy.metrics import PREEMPTIONS, group_tags, scheduler_stats, send_count

        tags = group_tags(event.victim.dag_id, event.victim.task_id, event.tier or None, event.pool)
        send_count(PREEMPTIONS, 1, tags, stats=scheduler_stats())
    except Exception:
        log.exception("airflow-comfy: could not count the preemption of %s", event.victim)


def _take_lock(session: Any) -> bool:
    """One watcher per tick across schedulers (PostgreSQL advisory lock, released with the transaction)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    from sqlalchemy import text

    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}).scalar())


def wait_for_scheduler(component: Any, timeout: float = 60.0) -> bool:
    """Whether ``component`` (the Job passed to ``on_starting``) turns out to be the scheduler's. The job type
    is set by the job runner just after the job is created, so it is polled briefly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job_type = getattr(component, "job_type", None)
        if job_type:
            return job_type == "SchedulerJob"
        time.sleep(0.2)
    return False


def preemption_policy(settings: Any = None) -> PreemptionPolicy | None:
    """The policy from ``[comfy]``: ``preemption`` (on/off), ``preempt_tiers`` (the tiers that may preempt: a
    task below the lowest of their weights may be preempted), ``preempt_after`` (seconds) and ``preempt_max``
    (the starvation guard). None when preemption is off."""
    from airflow_comfy.config import get_settings

    settings = settings or get_settings()
    if not settings.preemption:
        return None
    tiers = settings.tier_weights
    return PreemptionPolicy(
        vip_weight=min(tiers[name] for name in preempting_tiers(settings.preempt_tiers, tiers)),
        preempt_after=settings.preempt_after,
        max_preemptions=settings.preempt_max,
        tier_weights=tuple(sorted(set(tiers.values()))),
        tier_names=tuple((weight, name) for name, weight in tiers.items()),
    )


def preempting_tiers(text: str, tiers: dict[str, int]) -> list[str]:
    """``[comfy] preempt_tiers`` as tier names; empty: the tier with the highest weight."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in tiers]
    if unknown:
        raise ValueError(f"[comfy] preempt_tiers: {', '.join(unknown)} must name tiers of [comfy] tiers "
                         f"({', '.join(tiers)})")
    return names or [max(tiers, key=tiers.__getitem__)]
