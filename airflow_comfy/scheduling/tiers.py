"""Priority tiers: names people use in sidecars, mapped to Airflow priority weights.

Airflow's scheduler orders queued task instances by priority_weight, highest first (then the run's logical
date and map index: ``SchedulerJobRunner._executable_task_instances_to_queued``), and takes them as pool slots
free up; a running task is never interrupted. So a ``vip`` run's tasks jump ahead of every queued ``batch``
task.
The weights are far apart so that a DAG's own upstream/downstream weight rule never lets a lower tier overtake.
"""

from __future__ import annotations

PRIORITY_TIERS: dict[str, int] = {
    "vip": 10_000,
    "high": 1_000,
    "normal": 100,
    "batch": 1,
}
DEFAULT_TIER = "normal"


def priority_weight(tier: str | None, explicit: int | None = None) -> int:
    """The weight of a task: an explicit ``priority_weight`` wins over the tier."""
    if explicit is not None:
        return explicit
    return PRIORITY_TIERS[tier or DEFAULT_TIER]
