"""The cluster policy that gives each run's task instances the weight of the run's tier.

Installed with the package: ``pyproject.toml`` registers this module in the ``airflow.policy`` entry-point
group, which Airflow loads into its policy plugin manager (pluggy) in every Airflow process, before it imports
``airflow_local_settings`` (``airflow.settings.initialize``). Nobody has to add a line anywhere.

What it does: :func:`task_instance_mutation_hook` runs in the process that creates a run's task instances (the
scheduler for scheduled runs, the api-server or ``airflow dags trigger`` for triggered ones) and again when they
are refreshed (cleared, re-verified against a new DAG version). For a task of a DAG that offers the ``tier``
param (every workflow DAG; any DAG can, with :func:`airflow_comfy.scheduling.tiers.tier_param`), it sets
``priority_weight`` to the weight of the run's tier: the trigger conf's ``tier``, else the param's default.
Other DAGs are not touched. The weight is final: the tasks use ``weight_rule="absolute"``.

The trap this module works around (Airflow 3.3, ``airflow/settings.py`` and ``DagRun.verify_integrity``): the
scheduler only calls the hook while creating task instances when ``task_instance_mutation_hook.is_noop`` is
False, and Airflow sets that flag only in ``import_local_settings``, i.e. only when an
``airflow_local_settings`` module exists. A hook that comes from an entry point alone leaves it True, and
``verify_integrity`` then bulk-inserts the task instances with the task's own weight, never calling the hook.
So importing this module (which is how pluggy loads the plugin) clears the flag; see
:func:`_mark_hook_active`. The hook must not open a database session or commit (it runs inside the
scheduler's transaction): it only reads the run it is given and the task's DAG, already in memory.

Importing this module must stay cheap and must never import torch: every Airflow process imports it.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

from airflow.policies import hookimpl

from airflow_comfy.scheduling.tiers import TIER_PARAM, parse_tiers, run_tier

log = logging.getLogger(__name__)

__all__ = ["task_instance_mutation_hook"]


@hookimpl
def task_instance_mutation_hook(task_instance: Any, dag_run: Any) -> None:
    """Set ``task_instance.priority_weight`` to its run's tier weight (see the module docstring). Never
    raises: a failure here would stop the scheduler; the task instance then keeps its task's weight."""
    try:
        _apply_tier(task_instance, dag_run)
    except Exception:
        log.exception("airflow-comfy: could not set the tier weight of %s; it keeps its task's weight",
                      task_instance)


def _apply_tier(task_instance: Any, dag_run: Any) -> None:
    default = dag_default_tier(getattr(task_instance, "task", None))
    if default is None:  # not a tiered DAG, or the task is not known yet (the hook is called again later)
        return
    run = dag_run if dag_run is not None else _loaded_dag_run(task_instance)
    if run is None:  # a task instance not bound to a run yet: the task's own weight (the default tier's)
        return
    tiers = configured_tiers()
    if default not in tiers:
        return
    task_instance.priority_weight = tiers[run_tier(run.conf, default, tiers)]


def dag_default_tier(task: Any) -> str | None:
    """The default tier of ``task``'s DAG: its ``tier`` param's default, when that param is a dropdown (an
    ``enum``) of tier names; None for a DAG without one."""
    if task is None:
        return None
    try:
        dag = task.dag
    except Exception:  # an SDK operator not assigned to a DAG raises
        return None
    params = getattr(dag, "params", None)
    if not params or TIER_PARAM not in params:
        return None
    param = params.get_param(TIER_PARAM) if hasattr(params, "get_param") else None
    schema = getattr(param, "schema", None) or {}
    value = getattr(param, "value", None)
    if not isinstance(schema.get("enum"), list) or not isinstance(value, str):
        return None
    return value


def configured_tiers() -> dict[str, int]:
    """``[comfy] tiers``, parsed once per distinct value."""
    from airflow_comfy.config import raw_setting

    return _parse_tiers(raw_setting("tiers"))


@functools.lru_cache(maxsize=8)
def _parse_tiers(text: str) -> dict[str, int]:
    return parse_tiers(text)


def _loaded_dag_run(task_instance: Any) -> Any:
    """The task instance's run when the ORM has already loaded it, else None (loading it would query)."""
    try:
        from sqlalchemy import inspect
        from sqlalchemy.orm.base import NO_VALUE

        state = inspect(task_instance, raiseerr=False)
        if state is None:
            return None
        value = state.attrs.dag_run.loaded_value
    except Exception:
        return None
    return None if value is NO_VALUE else value


def _mark_hook_active() -> None:
    """Tell ``DagRun.verify_integrity`` that a task instance mutation hook exists (see the module docstring):
    what ``airflow.settings.import_local_settings`` does for a hook in ``airflow_local_settings``. Only ever
    sets the flag to False, as Airflow itself does."""
    settings = sys.modules.get("airflow.settings")
    if settings is None:
        import airflow.settings as settings
    hook = getattr(settings, "task_instance_mutation_hook", None)
    if hook is not None and getattr(hook, "is_noop", False):
        hook.is_noop = False


_mark_hook_active()
