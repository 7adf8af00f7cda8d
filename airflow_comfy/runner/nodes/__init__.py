"""Implementations of the built-in nodes, one module per family; each registers with
:func:`airflow_comfy.runner.registry.implements` against its declaration in ``workflow.core_nodes``."""
