"""``airflow-comfy``: the command line for people (convert, slice, check, render-pods, pools sync, run, gc).

Each command imports only what it needs: ``convert`` and ``slice`` touch neither Airflow nor torch.
Exit codes: 0 success, 2 the workflow (or sidecar) is invalid — the error names file, node, class and input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from airflow_comfy.version import __version__

EXIT_INVALID = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from airflow_comfy.workflow.errors import WorkflowError

    try:
        return args.func(args) or 0
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # `airflow-comfy slice x.json | head`
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-comfy", description="Run ComfyUI workflows as Airflow DAGs.")
    parser.add_argument("--version", action="version", version=f"airflow-comfy {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    convert = sub.add_parser("convert", help="print the API-format JSON a workflow means (what ComfyUI's "
                                             "frontend would send to /prompt)")
    convert.add_argument("workflow", type=Path)
    _object_info_arg(convert)
    convert.set_defaults(func=_convert)

    slice_ = sub.add_parser("slice", help="show the groups, their nodes, the edges and what crosses each edge")
    slice_.add_argument("workflow", type=Path)
    slice_.add_argument("--json", action="store_true", help="machine-readable output, with the group specs")
    _sidecar_arg(slice_)
    _object_info_arg(slice_)
    slice_.set_defaults(func=_slice)

    render = sub.add_parser("render-pods", help="print the pod manifests (YAML) the KubernetesPodOperator "
                                                "tasks would submit")
    render.add_argument("workflow", type=Path)
    _sidecar_arg(render)
    render.add_argument("--pool", default=None, metavar="NAME",
                        help="put every group in this pool (its resources, node selector, ...), whatever the "
                             "sidecar or the pool roles say")
    render.add_argument("--tier", default=None, metavar="NAME",
                        help="the run tier whose Kubernetes priority class the pods get (default: the "
                             "workflow's default tier)")
    _pools_file_arg(render)
    _object_info_arg(render)
    render.set_defaults(func=_render_pods)

    pools = sub.add_parser("pools", help="the GPU pools of the pools file ([comfy] pools_file)")
    pools_sub = pools.add_subparsers(metavar="ACTION")
    sync = pools_sub.add_parser("sync", help="create or update the Airflow pools declared in the pools file "
                                             "(idempotent; pools not in the file are left alone)")
    _pools_file_arg(sync)
    sync.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    sync.set_defaults(func=_pools_sync)

    run = sub.add_parser("run", help="run a workflow without Airflow, through the same runner subprocesses")
    run.add_argument("workflow", type=Path)
    run.add_argument("--models", type=Path, required=True, help="ComfyUI-style models folder")
    run.add_argument("--output", type=Path, required=True, help="folder for artifacts and images")
    run.add_argument("--input-dir", type=Path, default=None, help="folder LoadImage reads (default: --output/input)")
    run.add_argument("--store", default=None, help="artifact store URI (default: file://<--output>)")
    run.add_argument("--single-group", action="store_true", help="run the whole workflow as one group")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="set a trigger param")
    run.add_argument("--run-id", default=None,
                     help="the run's id (default: cli__<UTC time to the microsecond>_<random>). Reusing one with "
                          "the same workflow and params returns what that run committed without computing; with "
                          "another workflow version or other params it is refused (exit 2)")
    _sidecar_arg(run)
    _object_info_arg(run)
    run.set_defaults(func=_run)

    demo = sub.add_parser("make-demo-models", help="write tiny random-weight demo models (seconds, offline)")
    demo.add_argument("folder", type=Path)
    demo.add_argument("--inputs", type=Path, default=None,
                      help="also write the example workflows' input images (demo-input.png, demo-mask.png) here")
    demo.set_defaults(func=_make_demo_models)

    gc = sub.add_parser("gc", help="remove what tries that never committed left in the artifact store (values, "
                                   "staged and orphan images, temporary files)")
    gc.add_argument("--store", default=None, help="artifact store URI (default: [comfy] artifact_store)")
    gc.add_argument("--run", action="append", default=[], metavar="DAG_ID/RUN_ID",
                    help="only this run (repeatable; default: every run in the store)")
    gc.add_argument("--unfinished", action="store_true",
                    help="also clean groups that never committed: only for runs that are over (a running "
                         "try's files would go too)")
    gc.add_argument("--temp-older-than", type=float, default=3600.0, metavar="SECONDS",
                    help="remove temporary files not modified for this long (default 3600)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    gc.set_defaults(func=_gc)

    check = sub.add_parser("check", help="load every workflow of a folder as the DAG factory does and report")
    check.add_argument("folder", type=Path)
    _object_info_arg(check)
    check.set_defaults(func=_check)
    return parser


def _object_info_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--object-info", action="append", default=[], metavar="F", type=Path,
                        help="a ComfyUI /object_info JSON that defines custom nodes (repeatable)")


def _pools_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pools-file", type=Path, default=None, metavar="F",
                        help="pools YAML (default: [comfy] pools_file)")


def _sidecar_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sidecar", type=Path, default=None,
                        help="sidecar YAML (default: <workflow>.comfy.yaml beside the workflow, if present)")


def _catalog(args):
    from airflow_comfy.workflow.catalog import load_catalog

    return load_catalog(args.object_info)


def _convert(args) -> int:
    from airflow_comfy.workflow.loader import load_workflow

    workflow = load_workflow(args.workflow, _catalog(args))
    json.dump(workflow.to_api(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _compile(args):
    from airflow_comfy.factory.compile import compile_workflow
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
    from airflow_comfy.workflow.loader import read_workflow_file

    sidecar = load_sidecar(args.sidecar or sidecar_path(args.workflow))
    content = read_workflow_file(args.workflow)
    return compile_workflow(args.workflow, content, sidecar, _catalog(args), max_nodes=2_000), sidecar


def _slice(args) -> int:
    compiled, _ = _compile(args)
    if args.json:
        json.dump({"dag_id": compiled.dag_id, "mode": compiled.mode, "groups": compiled.groups,
                   "params": compiled.params}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{compiled.dag_id}: {len(compiled.groups)} group(s), sliced by {compiled.mode}")
    for group in compiled.groups:
        spec = group["spec"]
        own = [n for n in spec["nodes"] if n not in spec["recipe_nodes"]]
        print(f"\n[{group['task_id']}]" + (f"  <- {', '.join(group['upstream'])}" if group["upstream"] else ""))
        for node_id in own:
            print(f"  {node_id:>8}  {spec['nodes'][node_id]['class_type']}")
        for node_id in spec["recipe_nodes"]:
            parts = "/".join(spec["components"].get(node_id, []))
            print(f"  {node_id:>8}  {spec['nodes'][node_id]['class_type']}  (replayed: {parts})")
        for value in spec["boundary_inputs"]:
            print(f"  reads {value['type']} of node {value['node']} output {value['output']} "
                  f"from [{value['group']}]")
    return 0


def _render_pods(args) -> int:
    # Airflow logs to stdout (its root handler holds the stream it found when it configured logging, and
    # KPO logs a line per pod it builds): while anything of Airflow runs, stdout is stderr, down to the file
    # descriptor, so that stdout carries the YAML and nothing else.
    with _stdout_to_stderr():
        from airflow_comfy.config import get_settings
        from airflow_comfy.factory.loader import build_dag
        from airflow_comfy.operators.render import render_pod_manifests, to_yaml
        from airflow_comfy.scheduling.pools import check_pool_name, load_pools

        settings = get_settings(cache_dir="")
        pools = load_pools(args.pools_file if args.pools_file is not None else settings.pools_file)
        if args.pool:
            problem = check_pool_name(args.pool, pools, settings.default_pool)
            if problem:
                print(f"error: --pool: {problem}", file=sys.stderr)
                return EXIT_INVALID
        compiled, sidecar = _compile(args)
        for overrides in (sidecar.task_defaults, *sidecar.tasks.values()):
            overrides["backend"] = "kubernetes"
            if args.pool:
                overrides["pool"] = args.pool
        dag = build_dag(compiled, sidecar, settings, pools=pools)
        tier = args.tier or dag.params.get_param("tier").value
        if tier not in settings.tier_weights:
            print(f"error: --tier: {tier!r} is not a tier ([comfy] tiers: {', '.join(settings.tier_weights)})",
                  file=sys.stderr)
            return EXIT_INVALID
        for task in dag.tasks:  # what the priority class template renders to in a run of that tier
            if "{{" in (task.priority_class_name or ""):
                task.priority_class_name = settings.tier_classes.get(tier)
        text = to_yaml(render_pod_manifests(list(dag.tasks)))
    sys.stdout.write(text)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what is written to stdout inside the block to stderr: ``sys.stdout``, file descriptor 1 (whatever
    writes there directly, such as a logging handler holding the process's stdout stream), and, from now on,
    the logging handlers that hold that stream (so that nothing logged later follows the data either)."""
    _flush_stdout()
    _log_to_stderr()
    saved_fd = None
    with contextlib.suppress(OSError, ValueError):
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _log_to_stderr()  # the handlers configured inside the block
        _flush_stdout()
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _flush_stdout() -> None:
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()


def _log_to_stderr() -> None:
    stdout = {id(sys.stdout), id(sys.__stdout__)}
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and id(handler.stream) in stdout:
                handler.setStream(sys.stderr)


def _pools_sync(args) -> int:
    """Create or update the Airflow pools of the pools file, through Airflow's own pool API (the metadata
    database of the Airflow this process is configured for, as ``airflow pools set``)."""
    with _stdout_to_stderr():
        from airflow_comfy.config import get_settings
        from airflow_comfy.scheduling.pools import load_pools, sync_pools

        path = args.pools_file if args.pools_file is not None else get_settings().pools_file
        if not path:
            print("error: no pools file: set [comfy] pools_file or pass --pools-file", file=sys.stderr)
            return EXIT_INVALID
        lines = sync_pools(load_pools(path), dry_run=args.dry_run)
    for line in lines:
        print(line)
    return 0


def _gc(args) -> int:
    from airflow_comfy.artifacts.garbage import collect
    from airflow_comfy.artifacts.store import open_store

    if args.store:
        store = open_store(args.store)
    else:
        from airflow_comfy.config import get_settings

        settings = get_settings()
        store = open_store(settings.artifact_store, limits=settings.store_limits)
    result = collect(store, run_keys=args.run, unfinished=args.unfinished, temp_older_than=args.temp_older_than,
                     dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for uri in result.removed:
        print(f"{verb} {uri}")
    for group in result.unfinished:
        print(f"left alone (never committed; --unfinished cleans it): {group}")
    print(f"{verb} {len(result.removed)} object(s) from {store.root_uri}")
    return 0


def _run(args) -> int:
    from airflow_comfy.local_run import GroupFailed, compile_for_run, parse_param_assignments, run_workflow

    compiled = compile_for_run(args.workflow, sidecar=args.sidecar, single_group=args.single_group,
                               object_info=args.object_info)
    output = args.output.resolve()
    store = args.store or output.as_uri()
    input_dir = (args.input_dir or output / "input").resolve()
    try:
        result = run_workflow(compiled, models=args.models.resolve(), input_dir=input_dir, store=store,
                              params=parse_param_assignments(args.param, compiled), run_id=args.run_id)
    except GroupFailed as exc:
        print(exc.output.rstrip("\n"), file=sys.stderr)  # the runner's log, once; the error says what failed
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID if exc.returncode == EXIT_INVALID else 1
    for image in result.images:
        uri = image["uri"]
        print(f"output: {uri[len('file://'):] if uri.startswith('file://') else uri}")
    return 0


def _make_demo_models(args) -> int:
    from airflow_comfy.runner.models.demo import make_demo_models, write_demo_inputs

    for path in make_demo_models(args.folder):
        print(path)
    for path in write_demo_inputs(args.inputs) if args.inputs else []:
        print(path)
    return 0


BUILDING_STUB = "comfy_workflows.py"
ERROR_STUB = "comfy_workflow_errors.py"


def _check(args) -> int:
    """Print what Airflow will show for the folder with the two loader stubs in it: the DAGs of
    ``comfy_workflows.py`` and the import error of ``comfy_workflow_errors.py``."""
    import warnings

    from airflow_comfy.config import get_settings
    from airflow_comfy.factory.loader import scan_workflows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = scan_workflows(args.folder, get_settings(), object_info_files=[str(p) for p in args.object_info])
    print(f"DAGs of {BUILDING_STUB}:")
    for dag_id in sorted(scan.dags):
        tasks = scan.dags[dag_id].tasks
        print(f"  {dag_id}  ({scan.good[dag_id].name}): {len(tasks)} task(s): "
              f"{', '.join(t.task_id for t in tasks)}")
    if not scan.dags:
        print("  (none)")
    print("Import errors:")
    if scan.errors:
        print(f"  {ERROR_STUB}: ComfyWorkflowImportError: " + scan.import_error_text().replace("\n", "\n    "))
    else:
        print("  (none)")
    files = len({e.file for e in scan.errors})
    print(f"\n{len(scan.dags)} DAG(s); {files} workflow file(s) named in the import error of {ERROR_STUB}")
    return EXIT_INVALID if scan.errors else 0


if __name__ == "__main__":
    sys.exit(main())
