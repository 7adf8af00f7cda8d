"""``python -m airflow_comfy.runner run ...``: the command both operators run (see
:mod:`airflow_comfy.operators.command` for the Airflow side of the contract). Never imports Airflow.
``python -m airflow_comfy.runner serve ...`` runs the same jobs in a long-lived process that keeps its models
loaded (:mod:`airflow_comfy.runner.service`).

Exit codes: 0 success; 2 bad input (the spec, a param, a model file, an input image, a store that refuses for
good, a run key taken by another spec: retrying cannot help); 1 anything else (infrastructure: a stalled or
full store, the device, out of memory, the deadline ...), which Airflow retries. The last line on stderr says
what failed, in one sentence (:mod:`airflow_comfy.runner.failure`).

Before torch is imported, :mod:`airflow_comfy.runner.preflight` returns the manifest of a try that already
committed the group (nothing is computed twice), refuses a run key taken by another spec, and checks that the
store can be written and the upstream manifests read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from airflow_comfy.workflow.groupspec import (
    EXIT_BAD_INPUT,
    EXIT_INFRASTRUCTURE,
    EXIT_OK,
    RUNNER_DEADLINE_ENV,
    GroupSpec,
)

DEFAULT_THREADS = 4


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """Run the command; ``process``: this is the runner process itself (``python -m airflow_comfy.runner``), whose
    deadline (``--deadline``) may end it."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from airflow_comfy.runner.service import serve

        return serve(args.socket, cache_budget_mb=args.cache_budget_mb, idle_timeout=args.idle_timeout,
                     cancel_grace=args.cancel_grace)
    configure_process()
    from airflow_comfy.runner.deadline import start_watchdog
    from airflow_comfy.runner.failure import BAD_INPUT, FAILED, describe, print_traceback, report

    state: dict = {}
    # In a runner process only: a runner service's job is bounded by its task (its timeout cancels the job).
    watchdog = start_watchdog(args.deadline if process else None,
                              lambda: getattr(state.get("context"), "current_node", None))
    try:
        manifest = run(args, state)
    except _BAD_INPUT_ERRORS() as exc:
        report(BAD_INPUT, str(exc))
        return EXIT_BAD_INPUT
    except Exception as exc:  # infrastructure: retryable
        from airflow_comfy.artifacts.errors import ArtifactError

        store_error = isinstance(exc, ArtifactError)  # says all there is (the URI and why): no traceback
        if not store_error:
            print_traceback()
        report(FAILED, describe(exc, getattr(state.get("context"), "current_node", None), with_type=not store_error))
        return EXIT_INFRASTRUCTURE
    finally:
        if watchdog is not None:
            watchdog.cancel()
    text = json.dumps(manifest, indent=2)
    for target in (args.xcom_path, args.manifest_out):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(text, encoding="utf-8")
    print(f"manifest: {manifest['manifest_uri']}", flush=True)
    return EXIT_OK


def configure_process() -> None:
    """Logging to stdout (``LEVEL message`` lines, :mod:`airflow_comfy.log_lines`) and the libraries' quiet
    defaults: what a runner process sets before its job (a runner service once at start, and again, to the same
    effect, for each job: ``basicConfig`` does nothing once the root logger has a handler)."""
    from airflow_comfy.log_lines import RunnerLogFormatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(RunnerLogFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # diffusers/transformers report every dtype move ("modules ... should be kept in float32") at INFO/WARNING:
    # noise in a task log. Their errors still show.
    # (They configure their loggers on import, from these variables.)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for library in ("diffusers", "transformers"):
        logging.getLogger(library).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m airflow_comfy.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    run_ = sub.add_parser("run", help="execute one group spec")
    run_.add_argument("--spec", required=True,
                      help="URI of the GroupSpec in the artifact store (file://, s3://), or a data: URI")
    run_.add_argument("--spec-sha256", default=None,
                      help="sha256 of the spec's bytes: checked before the spec is used (required for a store URI)")
    run_.add_argument("--store", required=True, help="artifact store URI (file://... or s3://bucket/prefix)")
    run_.add_argument("--run-key", required=True, help="<dag_id>/<run_id>: scope of this run's artifacts")
    run_.add_argument("--try", dest="try_number", type=int, default=1)
    run_.add_argument("--params", default="{}", help="the run's params as JSON")
    run_.add_argument("--inputs", action="append", default=[], help="manifest URI of an upstream group")
    run_.add_argument("--models", required=True, type=Path, help="ComfyUI-style models folder")
    run_.add_argument("--input-dir", required=True, type=Path, help="folder LoadImage reads from")
    run_.add_argument("--input-store", default="",
                      help="s3://bucket/prefix of the input store: image inputs may name objects under it")
    run_.add_argument("--input-root", default=None, type=Path,
                      help="the input folder as file:// image URIs name it (default: --input-dir)")
    run_.add_argument("--xcom-path", default=None, help="pod: write the manifest here for KPO's xcom sidecar")
    run_.add_argument("--manifest-out", default=None, help="local: write the manifest here")
    run_.add_argument("--device", default=os.environ.get("COMFY_RUNNER_DEVICE", "auto"),
                      help="auto (CUDA when present), cpu, cuda, cuda:N")
    run_.add_argument("--precision", default=os.environ.get("COMFY_RUNNER_PRECISION", "auto"),
                      choices=["auto", "fp32", "fp16", "bf16"],
                      help="compute dtype of UNet and text encoders (auto: fp16 on CUDA, fp32 on CPU; "
                           "the VAE stays fp32 unless bf16)")
    run_.add_argument("--threads", type=int, default=int(os.environ.get("COMFY_RUNNER_THREADS", DEFAULT_THREADS)),
                      help="CPU threads; fixed so that every group computes the same bits")
    run_.add_argument("--memory-budget-mb", type=_budget,
                      default=os.environ.get("COMFY_RUNNER_MEMORY_BUDGET_MB") or None,
                      help="test and cap memory use: the VAE and the attentions check the size of their largest "
                           "allocation against this many MiB and run out of memory (as torch would) when over; "
                           "a node that runs out of memory is retried once in low-memory mode (tiled VAE, "
                           "sliced attention). Default: none (env COMFY_RUNNER_MEMORY_BUDGET_MB)")
    run_.add_argument("--deadline", type=_seconds, default=os.environ.get(RUNNER_DEADLINE_ENV) or None,
                      help="seconds after which the runner gives up, saying what it was doing, with exit code 1 "
                           "(env COMFY_RUNNER_DEADLINE_S; the operators set it a little under execution_timeout)")
    run_.add_argument("--allow-pickle", action="store_true",
                      default=os.environ.get("COMFY_RUNNER_ALLOW_PICKLE") == "1",
                      help="allow .ckpt/.pt/.pth model files (loaded with torch.load(weights_only=True))")
    serve = sub.add_parser("serve", help="keep models loaded and run group specs sent over a Unix socket "
                                         "(the local backend's warm runner service)")
    serve.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    serve.add_argument("--cache-budget-mb", type=_cache_budget, default=8192.0,
                       help="MiB of loaded models kept between jobs (least recently used go first; 0: none)")
    serve.add_argument("--idle-timeout", type=float, default=600.0,
                       help="seconds without a job after which the service exits")
    serve.add_argument("--cancel-grace", type=float, default=5.0,
                       help="seconds a cancelled job has to stop before the service exits")
    return parser


def _finite_number(unit: str, *, allow_zero: bool = False):
    """An argparse type: a finite number of ``unit``, positive (or zero with ``allow_zero``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            bound = "0 or a positive" if allow_zero else "a positive"
            raise argparse.ArgumentTypeError(f"must be {bound} number of {unit}, got {text!r}")
        return value
    return parse


_cache_budget = _finite_number("MiB", allow_zero=True)
_budget = _finite_number("MiB")
_seconds = _finite_number("seconds")


def _BAD_INPUT_ERRORS() -> tuple[type[BaseException], ...]:
    from airflow_comfy.artifacts.errors import StoreRefused
    from airflow_comfy.artifacts.store import BadArtifact
    from airflow_comfy.runner.preflight import RunKeyCollision, UpstreamMissing
    from airflow_comfy.workflow.errors import WorkflowError

    errors: tuple[type[BaseException], ...] = (BadArtifact, WorkflowError, _SpecError, StoreRefused,
                                               RunKeyCollision, UpstreamMissing)
    if "torch" in sys.modules:  # these modules import torch: a failure before it was imported is none of them
        from airflow_comfy.runner.context import BadInput
        from airflow_comfy.runner.models.files import ModelFileError

        errors += (BadInput, ModelFileError)
    return errors


class _SpecError(ValueError):
    pass


def run(args: argparse.Namespace, state: dict | None = None) -> dict:
    """Run the group (``state`` gets the ``context`` once there is one, for failure messages)."""
    from airflow_comfy.artifacts.store import open_store
    from airflow_comfy.runner import preflight
    from airflow_comfy.runner.commit import clean
    from airflow_comfy.runner.faults import crash_point

    store = open_store(args.store)
    spec = _read_spec(args.spec, args.spec_sha256, store)
    params = _read_params(args.params)
    spec_sha256 = preflight.spec_digest(spec, args.spec_sha256)
    committed, _ = preflight.committed_manifest(store, spec, args.run_key, spec_sha256, params)
    if committed is not None:
        logging.getLogger("airflow_comfy.runner").info(
            "group %s: already committed by try %d of this run (same spec and params): returning its manifest, "
            "computing nothing", spec.group, committed.try_number)
        clean(store, args.run_key, spec.group, committed)
        return committed.to_dict()
    preflight.check_writable(store, args.run_key, spec.group, args.try_number)
    manifests = preflight.read_upstream(store, spec, args.inputs)
    crash_point("start")
    return _execute(args, store, spec, spec_sha256, params, manifests, {} if state is None else state)


def _execute(args: argparse.Namespace, store, spec: GroupSpec, spec_sha256: str, params: dict, manifests: list,
             state: dict) -> dict:
    import torch

    from airflow_comfy.runner.context import RunContext
    from airflow_comfy.runner.executor import GroupRun

    torch.set_num_threads(max(1, args.threads))
    device = _device(args.device)
    context = RunContext(models_root=args.models, input_dir=args.input_dir, device=device,
                         input_store=args.input_store, input_root=args.input_root,
                         dtype=_dtype(args.precision, device), allow_pickle=args.allow_pickle,
                         memory_budget=None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20))
    state["context"] = context
    logging.getLogger("airflow_comfy.runner").info(
        "group %s of %s: %d node(s) on %s, %d thread(s)%s", spec.group, spec.workflow_name, len(spec.nodes), device,
        torch.get_num_threads(),
        "" if args.memory_budget_mb is None else f", memory budget {args.memory_budget_mb:g} MiB")
    group_run = GroupRun(spec=spec, store=store, run_key=args.run_key, try_number=args.try_number,
                         params=params, input_manifests=manifests, context=context, spec_sha256=spec_sha256)
    return group_run.execute().to_dict()


def _read_spec(value: str, sha256: str | None, store) -> GroupSpec:
    """The GroupSpec from its content address in the store (checked against ``sha256``), or from a data: URI.
    A spec that cannot be fetched, or whose bytes do not match the hash, is an infrastructure failure (the
    task's next try writes it again); one that was read intact but is not a valid spec is bad input."""
    from airflow_comfy.artifacts.specs import read_spec_bytes
    from airflow_comfy.artifacts.store import read_uri

    if value.startswith("data:"):
        data = None
    elif sha256 is None:
        raise _SpecError(f"--spec {value} needs --spec-sha256 (the hash of the spec's bytes)")
    else:
        try:
            store.key_of(value)
        except ValueError:
            data = read_spec_bytes(_UriReader(read_uri), value, sha256)
        else:
            data = read_spec_bytes(store, value, sha256)
    log = logging.getLogger("airflow_comfy.runner")
    if data is None:
        log.info("group spec: a data: URI of %d characters", len(value))
    else:
        log.info("group spec: %s (sha256 %s, %d bytes)", value, sha256, len(data))
    try:
        return GroupSpec.from_data_uri(value) if data is None else GroupSpec.from_json(data.decode("utf-8"))
    except (ValueError, KeyError, TypeError) as exc:
        raise _SpecError(f"cannot read the group spec {value[:200]}: {exc}") from exc


class _UriReader:
    """``read_uri`` with a store's interface, for a spec outside ``--store``."""

    def __init__(self, reader):
        self.read_uri = reader


def _read_params(text: str) -> dict:
    try:
        params = json.loads(text or "{}")
    except ValueError as exc:
        raise _SpecError(f"--params is not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise _SpecError("--params must be a JSON object")
    return params


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return device


def _dtype(precision: str, device):
    import torch

    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
