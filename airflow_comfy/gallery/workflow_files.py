"""Which workflow file a DAG is built from, for the route that shows it (the DAG docs link there; Airflow's
*Code* tab shows only the loader stub).

The file is found from the DAG itself, never from a path in the request: the DAG must be one the loader built
(every task one of our group operators, as its serialized form in the metadata database says), and its docs'
``Source:`` line (:func:`airflow_comfy.factory.docs.workflow_source_of`) names the file. That file is then
served only when its real path (symbolic links resolved) is a regular file directly inside the workflows
folder: ``[comfy] workflows_folder``, else the loader stub's folder (where the loader looks when the setting is
empty). Anything else is :class:`NoWorkflowFile` (HTTP 404, with the sentence).

Only imported by the api-server (through :mod:`airflow_comfy.gallery.app`); Airflow is imported lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_comfy.factory.docs import workflow_source_of
from airflow_comfy.factory.sidecar import sidecar_path

#: The module every group operator of ours lives under.
_OPERATOR_MODULES = "airflow_comfy.operators."


class NoWorkflowFile(LookupError):
    """No workflow file to show for this DAG (HTTP 404); the message says why."""


@dataclass(frozen=True)
class WorkflowDag:
    """What the route needs of a workflow DAG: its file as the docs name it, and the folder it must be in."""

    dag_id: str
    source: str
    folder: Path


def workflow_dag(dag_id: str) -> WorkflowDag:
    """The workflow DAG ``dag_id`` as the metadata database knows it; :class:`NoWorkflowFile` when there is no
    such DAG or it is not one the airflow-comfy loader built."""
    from airflow.models.serialized_dag import SerializedDagModel

    dag = SerializedDagModel.get_dag(dag_id)
    if dag is None:
        raise NoWorkflowFile(f"there is no DAG {dag_id!r}")
    source = workflow_source_of(dag.doc_md or "") if _all_ours(dag.tasks) else None
    if not source:
        raise NoWorkflowFile(f"the DAG {dag_id!r} is not built from a ComfyUI workflow file by airflow-comfy")
    return WorkflowDag(dag_id, source, workflows_folder(dag.fileloc))


def _all_ours(tasks: list[Any]) -> bool:
    return bool(tasks) and all(str(getattr(task, "_task_module", "")).startswith(_OPERATOR_MODULES)
                               for task in tasks)


def workflows_folder(stub_path: str) -> Path:
    """Where the loader reads workflows: ``[comfy] workflows_folder``, else the folder of the stub that built
    the DAG."""
    from airflow_comfy.config import get_settings

    configured = get_settings().workflows_folder
    return Path(configured) if configured else Path(stub_path).parent


def confined_workflow_file(folder: Path, source: str) -> Path:
    """The real path of ``source`` when it is a regular file directly inside ``folder`` (after resolving every
    symbolic link, of the folder's too); :class:`NoWorkflowFile` otherwise."""
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(source)
    name = Path(source).name
    if os.path.dirname(real) != real_folder:
        raise NoWorkflowFile(f"{name!r} is not a file of the workflows folder {str(folder)!r} (a symbolic link "
                             "out of the folder is never followed here)")
    if not os.path.isfile(real):
        raise NoWorkflowFile(f"{name!r} is no longer in the workflows folder {str(folder)!r}")
    return Path(real)


def read_workflow_file(dag: WorkflowDag, *, sidecar: bool = False) -> tuple[str, bytes]:
    """(file name, bytes) of the DAG's workflow JSON, or of its sidecar; :class:`NoWorkflowFile` when it is not
    there (a workflow without a sidecar) or not confined to the workflows folder."""
    source = str(sidecar_path(Path(dag.source))) if sidecar else dag.source
    if sidecar and not os.path.lexists(source):
        raise NoWorkflowFile(f"the workflow of DAG {dag.dag_id!r} has no sidecar ({Path(source).name!r})")
    real = confined_workflow_file(dag.folder, source)
    try:
        return Path(source).name, real.read_bytes()
    except OSError as exc:
        raise NoWorkflowFile(f"cannot read {Path(source).name!r}: {exc.strerror or exc}") from None
