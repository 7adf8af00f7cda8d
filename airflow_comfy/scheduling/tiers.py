"""Priority tiers, chosen per run: names people trigger with, mapped to Airflow priority weights and Kubernetes
priority classes.

A run's tier is its trigger conf's ``tier`` (the dropdown param every workflow DAG has), else the DAG's default
(the sidecar's ``priority``), else ``[comfy] default_tier``. Every task instance of the run gets that tier's
weight (``[comfy] tiers``), set by the cluster policy in :mod:`airflow_comfy.scheduling.policy` when the
scheduler creates the task instances; a group pod gets the tier's ``priorityClassName`` (``[comfy]
priority_classes``), rendered from the run's params when the task runs. So one DAG serves every tier.

Airflow's scheduler orders queued task instances by priority_weight, highest first (then the run's logical
date and map index: ``SchedulerJobRunner._executable_task_instances_to_queued``), and takes them as pool slots
free up; a running task is never interrupted. So a ``vip`` run's tasks jump ahead of every waiting ``batch``
task. Tasks use ``weight_rule="absolute"``: a task's weight is its tier's weight whatever the DAG's shape (the
default ``downstream`` rule would add up the weights of a task's downstream tasks).

Pure Python: no Airflow, no torch (the policy runs inside the scheduler).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: The name of the trigger param (and conf key) that chooses a run's tier.
TIER_PARAM = "tier"
WEIGHT_RULE = "absolute"
#: Airflow stores priority_weight in a 32-bit column (and clamps sums into it).
MAX_WEIGHT = 2**31 - 1

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
# A Kubernetes object name (DNS subdomain): what PriorityClass names must be.
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class TierError(ValueError):
    """A tier setting that cannot be used."""


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition(":")
        if not sep:
            raise TierError(f"{what}: {item!r} is not 'tier:value'")
        pairs.append((name.strip(), value.strip()))
    return pairs


def parse_tiers(text: str) -> dict[str, int]:
    """``"vip:10000,high:1000,normal:100,batch:1"`` -> ``{"vip": 10000, ...}`` (in the order given)."""
    tiers: dict[str, int] = {}
    for name, value in _pairs(text, "[comfy] tiers"):
        if not _NAME_RE.match(name):
            raise TierError(f"[comfy] tiers: tier name {name!r} must be lowercase letters, digits, '_' or '-'")
        if name in tiers:
            raise TierError(f"[comfy] tiers: tier {name!r} is listed twice")
        try:
            weight = int(value)
        except ValueError:
            raise TierError(f"[comfy] tiers: the weight of {name!r} must be an integer, not {value!r}") from None
        if not 1 <= weight <= MAX_WEIGHT:
            raise TierError(f"[comfy] tiers: the weight of {name!r} must be between 1 and {MAX_WEIGHT}")
        tiers[name] = weight
    if not tiers:
        raise TierError("[comfy] tiers must name at least one tier")
    return tiers


def parse_priority_classes(text: str, tiers: Mapping[str, int]) -> dict[str, str]:
    """``"vip:airflow-comfy-vip,..."`` -> ``{"vip": "airflow-comfy-vip", ...}``; a tier left out (or the whole
    setting empty) gets no ``priorityClassName``."""
    classes: dict[str, str] = {}
    for tier, name in _pairs(text, "[comfy] priority_classes"):
        if tier not in tiers:
            raise TierError(f"[comfy] priority_classes: {tier!r} is not a tier ([comfy] tiers: "
                            f"{', '.join(tiers)})")
        if not name:
            continue
        check_priority_class_name(name, "[comfy] priority_classes")
        classes[tier] = name
    return classes


def check_priority_class_name(name: str, what: str) -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN_RE.match(name):
        raise TierError(f"{what}: {name!r} is not a valid Kubernetes object name (lowercase letters, digits, "
                        "'-' and '.')")
    return name


def check_default_tier(tier: str, tiers: Mapping[str, int], what: str) -> str:
    if tier not in tiers:
        raise TierError(f"{what}: {tier!r} is not a tier; the tiers ([comfy] tiers) are {', '.join(tiers)}")
    return tier


def tier_of_weight(weight: int, tiers: Mapping[str, int]) -> str:
    """The tier of a task instance of ``weight``: the tier with the highest weight not above it (a preempted
    task's weight is one more than its tier's); ``"none"`` below every tier."""
    below = [(w, name) for name, w in tiers.items() if w <= weight]
    return max(below)[1] if below else "none"


def run_tier(conf: Any, default: str, tiers: Mapping[str, int]) -> str:
    """The tier of a run: its conf's ``tier`` when that names a tier, else ``default``."""
    chosen = conf.get(TIER_PARAM) if isinstance(conf, Mapping) else None
    return chosen if isinstance(chosen, str) and chosen in tiers else default


def tier_param_schema(default: str, tiers: Mapping[str, int]) -> dict[str, Any]:
    """``Param`` arguments of the ``tier`` trigger param: a dropdown of the tiers, ``default`` selected."""
    return {
        "default": check_default_tier(default, tiers, "tier param"),
        "type": "string",
        "enum": list(tiers),
        "title": "Tier",
        "description": "Priority of this run: its tasks get the tier's weight ("
                       + ", ".join(f"{name} {weight}" for name, weight in tiers.items())
                       + ") and, as pods, its Kubernetes priority class.",
    }


def tier_param(default: str, tiers: Mapping[str, int]):
    """The ``tier`` trigger param (an ``airflow.sdk.Param``). Any DAG that declares it (``params={"tier":
    tier_param("normal", tiers)}``) gets per-run weights from the policy, as the workflow DAGs do."""
    from airflow.sdk import Param

    schema = tier_param_schema(default, tiers)
    return Param(schema.pop("default"), **schema)


def priority_class_template(classes: Mapping[str, str]) -> str | None:
    """A Jinja template rendering the ``priorityClassName`` of the running task's tier (its run's params:
    the DAG's default merged with the trigger conf), or an empty string for a tier without one. None when no
    tier has a class. The names are checked Kubernetes names, so they are safe inside the template."""
    if not classes:
        return None
    for name in classes.values():
        check_priority_class_name(name, "priority class")
    mapping = ", ".join(f"{tier!r}: {name!r}" for tier, name in classes.items())
    return f"{{{{ {{{mapping}}}.get(params.get({TIER_PARAM!r}), '') }}}}"
