"""Per-group task settings, filled from the ``[comfy]`` configuration and the workflow's sidecar."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("local", "kubernetes")


@dataclass(frozen=True)
class GroupTaskConfig:
    """How one group's task runs. ``None`` means "use the ``[comfy]`` setting".

    Kubernetes structures (``resources``, ``tolerations``, ``affinity``) are plain dicts in the Kubernetes
    API's own (camelCase) form, e.g. ``{"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}`` or
    ``{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}``.
    """

    backend: str = "local"  # "local" | "kubernetes"
    image: str | None = None  # None -> settings.runner_image
    pool: str | None = None  # None -> settings.default_pool
    pool_slots: int = 1
    #: The task's own weight (``weight_rule="absolute"``): the workflow's default tier's; the cluster policy sets
    #: each run's task instances to their run's tier weight.
    priority_weight: int = 1
    retries: int = 0
    retry_delay_seconds: float = 60.0
    #: True: the delay doubles with each retry (Airflow multiplier 2.0); a number is used as the multiplier.
    retry_exponential_backoff: bool | float = False
    #: the longest delay between retries (None: Airflow's ``[core] max_task_retry_delay``)
    max_retry_delay_seconds: float | None = None
    execution_timeout_seconds: float | None = None
    resources: dict[str, dict[str, Any]] | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    #: A PriorityClass name or a Jinja template rendering one when the task runs (the factory's default renders
    #: the run's tier's class, ``tiers.priority_class_template``); rendering to "" sets none.
    priority_class_name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    runtime_class_name: str | None = None  # the pod's runtimeClassName (from its pool)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.pool_slots < 1:
            raise ValueError(f"pool_slots must be at least 1, not {self.pool_slots}")
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, not {self.retries}")
        if self.resources is not None:
            unknown = set(self.resources) - {"requests", "limits"}
            if unknown:
                raise ValueError(f"resources may only have 'requests' and 'limits', not {sorted(unknown)}")
        # tolerations may come as a list from YAML; keep the dataclass hashable-ish and immutable
        object.__setattr__(self, "tolerations", tuple(self.tolerations))

    @property
    def backoff_multiplier(self) -> float:
        """Airflow 3's ``retry_exponential_backoff`` is a multiplier (0: constant delay; 1.0 would be constant
        too, so ``True`` must become 2.0, not 1)."""
        if isinstance(self.retry_exponential_backoff, bool):
            return 2.0 if self.retry_exponential_backoff else 0.0
        return float(self.retry_exponential_backoff)
