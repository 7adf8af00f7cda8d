"""The runner command: the single contract between the Airflow side and the compute side.

Both operators (Kubernetes pod and local subprocess) run the very same command::

    python -m airflow_comfy.runner run
        --spec <store>/specs/sha256/<hex>.json --spec-sha256 <hex>   # the GroupSpec, content-addressed
        --store <artifact store URI>
        --run-key "{{ dag.dag_id }}/{{ run_id }}"
        --try "{{ ti.try_number }}"
        --params "{{ params | tojson }}"
        [--inputs "{{ ti.xcom_pull(task_ids='encode')['manifest_uri'] }}"]   # once per upstream group
        --models <models folder> --input-dir <input folder>
        [--input-store s3://bucket/prefix]         # image params may name objects under it
        [--input-root <input_path>]                # pod only: the folder file:// image URIs name
        [--xcom-path /airflow/xcom/return.json]    # pod only: KPO's xcom sidecar reads that file
        [--manifest-out <file>]                    # local only: where the runner writes its manifest

The ``{{ ... }}`` parts are Jinja templates that Airflow renders just before the task runs. The spec never
rides on the command line (Linux refuses one argument over 128 KiB, and a UI workflow in an output group's PNG
metadata is often larger): the task writes its bytes to the artifact store at their content address just
before the runner starts (:mod:`airflow_comfy.artifacts.specs`), and the runner checks the hash. Nothing of
the spec goes through Jinja, so a prompt containing ``{{`` reaches the runner untouched.

Exit codes: ``EXIT_OK`` (0) success; ``EXIT_BAD_INPUT`` (2) the inputs are wrong and trying again cannot help
(the operators raise ``AirflowFailException``, so Airflow does not retry); anything else is an infrastructure
failure (``AirflowException``: retried).

Pure functions: nothing here imports Airflow or the Kubernetes provider.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from airflow_comfy.artifacts.specs import spec_uri
from airflow_comfy.artifacts.store import ArtifactStore, open_store
from airflow_comfy.workflow.groupspec import EXIT_BAD_INPUT, EXIT_OK, GroupSpec

RUNNER_MODULE = "airflow_comfy.runner"
RUN_SUBCOMMAND = "run"

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "runner_arguments"]

#: Where the pod's runner writes its manifest; KPO's xcom sidecar reads it (``do_xcom_push=True``).
POD_XCOM_PATH = "/airflow/xcom/return.json"

#: Artifact keys are scoped by dag id / run id; the try number is passed on its own.
RUN_KEY_TEMPLATE = "{{ dag.dag_id }}/{{ run_id }}"
TRY_TEMPLATE = "{{ ti.try_number }}"
#: The run's params (DAG defaults merged with the trigger's values) as JSON. In a running task (Airflow 3 task
#: SDK) ``params`` is the plain dict returned by ``process_params(...)`` (``ParamsDict.validate()``), which
#: ``tojson`` serializes (it escapes ``<``, ``>``, ``&`` and ``'`` as ``\u00XX``: still the same JSON values).
PARAMS_TEMPLATE = "{{ params | tojson }}"
#: Key of the manifest dict (an upstream task's XCom return value) that holds the manifest's own URI.
MANIFEST_URI_KEY = "manifest_uri"


def inputs_template(upstream_task_id: str) -> str:
    """Jinja expression that renders to the manifest URI pushed (as XCom ``return_value``) by an upstream task."""
    return f"{{{{ ti.xcom_pull(task_ids={upstream_task_id!r})[{MANIFEST_URI_KEY!r}] }}}}"


@functools.lru_cache(maxsize=8)
def _store(uri: str) -> ArtifactStore:
    """The store object of a URI (only its naming is used here: no connection is made)."""
    return open_store(uri)


def runner_prefix(python: str) -> list[str]:
    """``[python, -m, airflow_comfy.runner]``: what the arguments of :func:`runner_arguments` follow."""
    return [python, "-m", RUNNER_MODULE]


def runner_arguments(
    spec: GroupSpec,
    *,
    store: str,
    models_path: str,
    input_path: str,
    upstream_task_ids: Sequence[str] | None = None,
    spec_sha256: str | None = None,
    run_key: str = RUN_KEY_TEMPLATE,
    try_number: str = TRY_TEMPLATE,
    params: str = PARAMS_TEMPLATE,
    input_uris: Sequence[str] | None = None,
    input_store: str = "",
    input_root: str | None = None,
) -> list[str]:
    """Arguments of the runner command common to both backends.

    By default they are Airflow templates (rendered just before the task runs): the run key, try number and
    params come from the task's context and each upstream group's manifest URI from its XCom
    (``upstream_task_ids``, default ``spec.upstream``: task id == group name). ``airflow-comfy run`` passes
    concrete values instead (``run_key``, ``try_number``, ``params`` JSON, ``input_uris``). ``spec_sha256`` is
    ``spec.sha256()`` when the caller already has it (the parse cache keeps it); the spec itself is published
    to ``store`` by whoever starts the runner (:func:`airflow_comfy.artifacts.specs.publish_spec`). The backend
    adds ``--xcom-path`` (pod) or ``--manifest-out`` (local). ``input_store``: the ``s3://`` input store image
    params may name; ``input_root``: the input folder as ``file://`` image URIs name it, where the runner sees
    it elsewhere (``input_path``, in a pod).
    """
    if input_uris is None:
        upstream = list(spec.upstream if upstream_task_ids is None else upstream_task_ids)
        input_uris = [inputs_template(task_id) for task_id in upstream]
    sha256 = spec_sha256 or spec.sha256()
    arguments = [
        RUN_SUBCOMMAND,
        "--spec", spec_uri(_store(store), sha256),
        "--spec-sha256", sha256,
        "--store", store,
        "--run-key", run_key,
        "--try", str(try_number),
        "--params", params,
    ]
    for uri in input_uris:
        arguments += ["--inputs", uri]
    arguments += ["--models", models_path, "--input-dir", input_path]
    if input_store:
        arguments += ["--input-store", input_store]
    if input_root is not None and input_root != input_path:
        arguments += ["--input-root", input_root]
    return arguments


def pod_arguments(arguments: Sequence[str]) -> list[str]:
    return [*arguments, "--xcom-path", POD_XCOM_PATH]


def local_arguments(arguments: Sequence[str], manifest_out: str) -> list[str]:
    return [*arguments, "--manifest-out", manifest_out]
