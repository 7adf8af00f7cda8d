"""airflow-comfy: run ComfyUI workflows as Apache Airflow DAGs.

The package root stays cheap to import (the dag-processor imports it on every parse): it imports neither
Airflow nor torch until a function that needs them is called.
"""

from __future__ import annotations

from airflow_comfy.version import __version__

__all__ = ["__version__", "get_provider_info", "load_workflows", "report_workflow_errors"]


def get_provider_info() -> dict:
    from airflow_comfy.provider_info import provider_info

    return provider_info()


def load_workflows(folder=None, globals_dict: dict | None = None, **kwargs):
    """Turn every workflow JSON in ``folder`` into a DAG placed in ``globals_dict``. See
    :func:`airflow_comfy.factory.loader.load_workflows`."""
    from airflow_comfy.factory.loader import load_workflows as _load

    return _load(folder, globals_dict, **kwargs)


def report_workflow_errors(folder=None, globals_dict: dict | None = None, **kwargs) -> None:
    """The second stub: raise one ``ComfyWorkflowImportError`` naming every workflow file in ``folder`` that
    cannot become a DAG (Airflow shows it as the stub's import error); return quietly when there is none.
    See :func:`airflow_comfy.factory.loader.find_workflow_errors`."""
    from airflow_comfy.factory.loader import ComfyWorkflowImportError, find_workflow_errors

    scan = find_workflow_errors(folder, globals_dict, **kwargs)
    if scan.errors:
        raise ComfyWorkflowImportError(scan.import_error_text())
