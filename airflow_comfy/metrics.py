"""The metrics of airflow-comfy, sent through Airflow's own metrics (StatsD, Datadog or OpenTelemetry: whatever
``[metrics]`` turns on): a group task sends its group's after the runner has returned, from the ``stats`` of its
manifest (:mod:`airflow_comfy.runner.run_stats`); the scheduler sends each group's queue wait
(:mod:`airflow_comfy.scheduling.queue_wait`) and the preemption watcher counts preemptions
(:mod:`airflow_comfy.scheduling.preemption`).

Every name starts with ``comfy.`` (after Airflow's ``[metrics] statsd_prefix``, ``airflow.`` by default).
Each metric is sent once under its plain name with the tags ``dag_id``, ``task_id`` (the group), ``tier`` and
``pool`` (OpenTelemetry, Datadog and StatsD with ``statsd_influxdb_enabled`` keep tags), and, while Airflow's
``[metrics] legacy_names_on`` is true (its default), once more under a name that carries the same four values,
``comfy.group.sampling.<dag_id>.<task_id>.<tier>.<pool>``, because plain StatsD drops tags (Airflow names its
own metrics the same two ways). ``deploy/monitoring/statsd-mapping.yaml`` turns those names back into labels.

:data:`METRIC_TYPES` lists every metric; the README's "Metrics" section documents each. Sending never fails the
task: a metrics error is a warning in the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

#: Timers (sent in milliseconds): metric name -> the manifest's ``stats.totals`` key (seconds).
GROUP_TIMINGS = {
    "comfy.group.model_load": "model_load_s",
    "comfy.group.sampling": "sampling_s",
    "comfy.group.decode": "decode_s",
    "comfy.group.compute": "compute_s",
}
#: Counters, incremented by the group's bytes: metric name -> ``stats.totals`` key.
GROUP_COUNTERS = {
    "comfy.group.bytes_in": "bytes_in",
    "comfy.group.bytes_out": "bytes_out",
    "comfy.group.image_bytes": "image_bytes",
}
#: Gauges (bytes): metric name -> ``stats.totals`` key; ``peak_cuda`` only from a group that ran on CUDA.
GROUP_GAUGES = {
    "comfy.group.peak_rss": "peak_rss_bytes",
    "comfy.group.peak_cuda": "peak_cuda_bytes",
}
#: A counter, one per group that finished (whatever its stats).
GROUP_DONE = "comfy.group.done"
#: A timer sent by the scheduler (:mod:`airflow_comfy.scheduling.queue_wait`): ready to run -> started.
QUEUE_WAIT = "comfy.group.queue_wait"
#: A counter sent by the preemption watcher (:mod:`airflow_comfy.scheduling.preemption`), per preempted task.
PREEMPTIONS = "comfy.preemptions"
#: Every metric this package sends and its StatsD type (the monitoring files' test checks them against it).
METRIC_TYPES = {
    **{name: "timer" for name in (*GROUP_TIMINGS, QUEUE_WAIT)},
    **{name: "counter" for name in (*GROUP_COUNTERS, GROUP_DONE, PREEMPTIONS)},
    **{name: "gauge" for name in GROUP_GAUGES},
}

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
log = logging.getLogger(__name__)


def group_tags(dag_id: str, task_id: str, tier: str | None, pool: str | None) -> dict[str, str]:
    return {"dag_id": dag_id, "task_id": task_id, "tier": tier or "none", "pool": pool or "none"}


def name_part(value: str) -> str:
    """One dot-separated part of a metric name: characters StatsD names cannot carry (dots included: a task
    id of a task group has one) become ``_``."""
    return _UNSAFE.sub("_", value) or "_"


def legacy_name(metric: str, tags: Mapping[str, str]) -> str:
    """``metric.<dag_id>.<task_id>.<tier>.<pool>``: the name that carries the tags for plain StatsD."""
    return ".".join([metric, *(name_part(tags[key]) for key in ("dag_id", "task_id", "tier", "pool"))])


def task_stats() -> Any:
    """The metrics module of task code (the task SDK's; the task runner initialises it)."""
    from airflow.sdk.observability import stats

    return stats


def scheduler_stats() -> Any:
    """The metrics module the scheduler initialises (Airflow core's: a separate copy from the task SDK's)."""
    from airflow.observability import stats

    return stats


def _legacy_names_on() -> bool:
    from airflow.sdk.configuration import conf

    return conf.getboolean("metrics", "legacy_names_on", fallback=True)


def send_timing(metric: str, seconds: float, tags: Mapping[str, str], stats: Any = None) -> None:
    _send(stats, "timing", metric, timedelta(seconds=seconds), tags)


def send_count(metric: str, count: int, tags: Mapping[str, str], stats: Any = None) -> None:
    _send(stats, "incr", metric, int(count), tags)


def send_gauge(metric: str, value: float, tags: Mapping[str, str], stats: Any = None) -> None:
    _send(stats, "gauge", metric, value, tags)


def _send(stats: Any, kind: str, metric: str, value: Any, tags: Mapping[str, str]) -> None:
    """``stats``: the metrics module (default :func:`task_stats`)."""
    emit = getattr(stats or task_stats(), kind)
    names = [metric, legacy_name(metric, tags)] if _legacy_names_on() else [metric]
    for index, name in enumerate(names):
        emit(name, value, tags=dict(tags) if index == 0 else None)


def emit_group_metrics(manifest: Mapping[str, Any], tags: Mapping[str, str], log: logging.Logger = log) -> None:
    """Send a finished group's metrics (from its manifest's ``stats.totals``; a manifest from before stats sends
    only :data:`GROUP_DONE`). Never raises."""
    try:
        totals = (manifest.get("stats") or {}).get("totals") or {}
        for metric, key in GROUP_TIMINGS.items():
            if isinstance(totals.get(key), (int, float)):
                send_timing(metric, float(totals[key]), tags)
        for metric, key in GROUP_COUNTERS.items():
            if isinstance(totals.get(key), int):
                send_count(metric, totals[key], tags)
        for metric, key in GROUP_GAUGES.items():
            if isinstance(totals.get(key), (int, float)):
                send_gauge(metric, totals[key], tags)
        send_count(GROUP_DONE, 1, tags)
    except Exception as exc:  # metrics inform; they never fail a group that succeeded
        log.warning("Could not send the group's metrics: %s: %s", type(exc).__name__, exc)


def task_tags(context: Any, task: Any) -> dict[str, str]:
    """The tags of a running group task: its DAG and task ids, the run's tier (the ``tier`` param) and its pool."""
    ti = context.get("ti") if isinstance(context, Mapping) else None
    params = context.get("params") if isinstance(context, Mapping) else None
    tier = params.get("tier") if isinstance(params, Mapping) else None
    dag_id = getattr(ti, "dag_id", None) or (task.dag_id if task.has_dag() else "unknown")
    return group_tags(dag_id, getattr(ti, "task_id", None) or task.task_id,
                      tier if isinstance(tier, str) else None, getattr(task, "pool", None))
