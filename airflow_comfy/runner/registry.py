"""Node implementations register against the declarations in :mod:`airflow_comfy.workflow.core_nodes`.

An implementation is a function ``fn(ctx: NodeContext, **inputs) -> tuple`` whose keyword parameters are the
node's declared inputs and whose result has one item per declared output (output nodes return ``()``).
:func:`check_registry` verifies that every declared node has exactly one implementation whose parameters
match the declaration; a test runs it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from airflow_comfy.workflow.core_nodes import CORE_NODES

NodeFunction = Callable[..., tuple]
_IMPLEMENTATIONS: dict[str, NodeFunction] = {}


def implements(class_type: str) -> Callable[[NodeFunction], NodeFunction]:
    def register(fn: NodeFunction) -> NodeFunction:
        if class_type in _IMPLEMENTATIONS:
            raise RuntimeError(f"{class_type} is implemented twice")
        _IMPLEMENTATIONS[class_type] = fn
        return fn

    return register


def implementation(class_type: str) -> NodeFunction:
    _load_all()
    try:
        return _IMPLEMENTATIONS[class_type]
    except KeyError:
        raise KeyError(f"the runner has no implementation of {class_type}") from None


def implemented_types() -> set[str]:
    _load_all()
    return set(_IMPLEMENTATIONS)


def check_registry() -> list[str]:
    """Mismatches between declarations and implementations (empty when they agree)."""
    _load_all()
    problems = []
    declared = {spec.class_type: spec for spec in CORE_NODES}
    for class_type in sorted(set(declared) - set(_IMPLEMENTATIONS)):
        problems.append(f"{class_type}: declared but not implemented")
    for class_type in sorted(set(_IMPLEMENTATIONS) - set(declared)):
        problems.append(f"{class_type}: implemented but not declared")
    for class_type in sorted(set(declared) & set(_IMPLEMENTATIONS)):
        params = list(inspect.signature(_IMPLEMENTATIONS[class_type]).parameters)[1:]
        names = [spec.name for spec in declared[class_type].inputs]
        if params != names:
            problems.append(f"{class_type}: parameters {params} differ from declared inputs {names}")
    return problems


def _load_all() -> None:
    # Importing the node modules registers their implementations.
    from airflow_comfy.runner.nodes import conditioning, image, latent, loaders, output, sampling  # noqa: F401
