"""``airflow-comfy run``: run a workflow without Airflow, through the very same runner subprocesses.

The groups run one after another in topological order, each as ``python -m airflow_comfy.runner run ...``
with the arguments the operators would give it (concrete values instead of Airflow templates). Used by people
trying a workflow and by the tests (sliced vs ``--single-group``). ``run_workflow(service=...)`` sends the same
arguments to a warm runner service instead (:mod:`airflow_comfy.runner.service`; the runner benchmark compares
the two).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_comfy.artifacts.errors import ArtifactError, StoreRefused
from airflow_comfy.artifacts.specs import publish_spec
from airflow_comfy.artifacts.store import open_store
from airflow_comfy.factory.compile import CompiledWorkflow, compile_workflow
from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
from airflow_comfy.operators.command import local_arguments, runner_arguments, runner_prefix
from airflow_comfy.operators.failure_text import runner_failure
from airflow_comfy.runner_service.client import ServiceConfig, ServiceDied, ServiceSession, ServiceUnavailable
from airflow_comfy.workflow.catalog import load_catalog
from airflow_comfy.workflow.errors import Problem, WorkflowError
from airflow_comfy.workflow.groupspec import EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE, GroupSpec
from airflow_comfy.workflow.loader import read_workflow_file


@dataclass
class LocalRunResult:
    run_key: str
    manifests: dict[str, dict] = field(default_factory=dict)
    """group -> its manifest."""

    @property
    def images(self) -> list[dict]:
        return [image for manifest in self.manifests.values() for image in manifest.get("images", [])]


class GroupFailed(RuntimeError):
    """A group's runner failed: the message says what failed (the runner's own sentence), then how it ended."""

    def __init__(self, group: str, returncode: int, output: str):
        self.group, self.returncode = group, returncode
        self.output = output
        """The runner's whole output (the log: its traceback, if any, is there)."""
        super().__init__(f"group {group!r}: {runner_failure(returncode, output.splitlines())}")


def compile_for_run(workflow: Path, *, sidecar: Path | None = None, single_group: bool = False,
                    object_info: list[Path] | None = None) -> CompiledWorkflow:
    loaded = load_sidecar(sidecar or sidecar_path(workflow))
    if single_group:
        loaded.slicing, loaded.groups = "single", {}
    return compile_workflow(workflow, read_workflow_file(workflow), loaded, load_catalog(object_info or []),
                            max_nodes=2_000)


def parse_param_assignments(assignments: list[str], compiled: CompiledWorkflow) -> dict[str, Any]:
    """``name=value`` pairs typed by the workflow's params (``seed=7`` is an int, ``prompt=a cat`` a string)."""
    known = {p["name"]: p for p in compiled.params}
    values: dict[str, Any] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            raise WorkflowError(Problem(
                f"--param {item!r}: expected name=value with one of: {', '.join(sorted(known))}",
                "bad_param", file=compiled.source))
        kind = known[name]["schema"].get("type")
        try:
            values[name] = (int(raw) if kind == "integer" else float(raw) if kind == "number"
                            else raw.lower() in ("1", "true", "yes") if kind == "boolean" else raw)
        except ValueError as exc:
            raise WorkflowError(Problem(f"--param {name}: {raw!r} is not a valid {kind}", "bad_param",
                                        file=compiled.source)) from exc
    return values


def run_workflow(compiled: CompiledWorkflow, *, models: Path, input_dir: Path, store: str,
                 params: dict[str, Any] | None = None, run_id: str | None = None, python: str | None = None,
                 extra_args: list[str] | None = None, echo=print, in_process: bool = False,
                 service: ServiceConfig | None = None) -> LocalRunResult:
    """Run every group in order. ``in_process`` calls the runner's ``main`` with the same arguments instead of
    starting a process per group (tests use it to save the interpreter start-up; the code path is the same).
    ``service`` runs each group as a job of the runner service it names (started on demand, on a CPU slot)."""
    run_key = f"{compiled.dag_id}/{run_id or new_run_id()}"
    all_params = {p["name"]: p["default"] for p in compiled.params} | dict(params or {})
    result = LocalRunResult(run_key=run_key)
    with tempfile.TemporaryDirectory(prefix="airflow-comfy-run-") as scratch:
        for group in compiled.groups:
            _run_group(group, result, models=models, input_dir=input_dir, store=store, params=all_params,
                       python=python, extra_args=extra_args, scratch=Path(scratch), echo=echo,
                       in_process=in_process, service=service)
    return result


def new_run_id() -> str:
    """``cli__<UTC time to the microsecond>_<4 random hex>``: two runs started in the same microsecond, on two
    machines, still get different run keys."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"cli__{now:%Y%m%dT%H%M%S.%f}_{secrets.token_hex(2)}"


def _run_group(group: dict, result: LocalRunResult, *, models: Path, input_dir: Path, store: str,
               params: dict[str, Any], python: str | None, extra_args: list[str] | None, scratch: Path,
               echo, in_process: bool, service: ServiceConfig | None = None) -> None:
    spec = GroupSpec.from_dict(group["spec"])
    inputs = [result.manifests[g]["manifest_uri"] for g in group["upstream"]]
    try:
        publish_spec(open_store(store), spec.to_bytes(), group["spec_sha256"])
    except ArtifactError as exc:  # as the operators do: retried, unless the store refuses for good
        code = EXIT_BAD_INPUT if isinstance(exc, StoreRefused) else EXIT_INFRASTRUCTURE
        raise GroupFailed(spec.group, code, f"could not write the group spec: {exc}") from None
    arguments = runner_arguments(
        spec, store=store, models_path=str(models), input_path=str(input_dir), spec_sha256=group["spec_sha256"],
        run_key=result.run_key, try_number="1", params=json.dumps(params), input_uris=inputs)
    manifest_out = scratch / f"manifest-{spec.group}.json"
    argv = local_arguments(arguments, str(manifest_out)) + list(extra_args or [])
    echo(f"[{spec.group}] running {len(spec.nodes)} node(s)")
    if in_process:
        from airflow_comfy.runner.cli import main as runner_main

        returncode = runner_main(argv)
        if returncode != 0:
            raise GroupFailed(spec.group, returncode, "(in-process run: its failure is in the log above)")
    elif service is not None:
        _run_in_service(spec.group, argv, service, echo)
    else:
        completed = subprocess.run(runner_prefix(python or sys.executable) + argv, capture_output=True, text=True)
        if completed.returncode != 0:
            raise GroupFailed(spec.group, completed.returncode, completed.stdout + completed.stderr)
    result.manifests[spec.group] = json.loads(manifest_out.read_text(encoding="utf-8"))


def _run_in_service(group: str, argv: list[str], config: ServiceConfig, echo) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    try:
        with ServiceSession(config, env, log=echo) as session:
            session.open()
            result = session.run(argv, env, on_lines=lines.extend)
    except (ServiceUnavailable, ServiceDied) as exc:
        raise GroupFailed(group, EXIT_INFRASTRUCTURE, f"runner service: {exc}") from None
    if result.code != 0:
        raise GroupFailed(group, result.code, "\n".join(lines))
