"""Parse-time benchmark: airflow-comfy's factory vs astronomer dag-factory building the same DAGs.

Run with ``make bench`` (``.venv/bin/python benchmarks/parse.py [--n N] [--repeat 3] [--scenario all|heavy|lean]
[--large 1000] [--verbose] [--profile] [--keep]``). See ``benchmarks/README.md`` for how to read the output.

Two scenarios and one figure (each measurement in a fresh fork, see "How it measures"):
    * heavy (below): the comfyui-workflow-templates against dag-factory YAML generated from our DAGs.
    * lean: N (default 200) copies of ``example_workflows/txt2img_api.json`` that differ in their prompt (2
      groups, so 2 tasks each), loaded with backend ``local`` and ``kubernetes`` (three cache states), against
      (a) dag-factory 1.1.0 on N YAML files of one DAG of 2 plain KubernetesPodOperators with short arguments
      and one dependency, and (b) a hand-written Python DAG file building the same N DAGs in a loop (the
      floor of operator construction). All build the same dag ids, task ids and dependencies. Targets: ours
      / dag-factory <= 0.8x cold, <= 0.4x warm. Beside this building stub (``load_workflows``), the error
      stub (``find_workflow_errors``, the second file the dag-processor parses every loop) on the same folder,
      and the sum of both stubs per parse loop, each in three cache states: cold (``cache_dir`` empty: the
      error stub builds every DAG whole), empty (a cache dir that does not exist yet: the first parse, which
      writes the cache; the error stub compiles and plans each file, no operators) and warm (the cache of an
      earlier parse: the error stub reads the verdicts). Then, unless ``--no-split``, a per-phase cost split
      of both stubs (cost_split: the package's own functions called in the loader's order, a timer around
      each) and a DAG/operator construction breakdown with reference operators (operator_detail); unless
      ``--no-serialize``, the cost of the dag-processor's next step, ``DagSerialization.to_dict``; with
      ``--profile``, cProfiles of a cold and a warm parse (``--profile-backend``).
    * ``--large N`` (default 1000; 0: off): one cold, empty-cache (cache-writing) and warm parse of a folder
      of N copies, wall and CPU, plus serialization, against ``dag_file_processor_timeout``; and the error
      stub's parse of it in the same three states.

What is compared (heavy)
    * airflow-comfy: ``load_workflows(folder, globals_dict, settings=...)`` on N ComfyUI workflow files (the
      templates of ``comfyui-workflow-templates`` that become DAGs, copied round-robin), backend
      ``kubernetes`` so every task is a ``ComfyGroupPodOperator`` (a KubernetesPodOperator).
    * dag-factory: its documented entry point ``dagfactory.load_yaml_dags(globals_dict, dags_folder=...)`` on
      N YAML files, one DAG per file, generated from the DAGs our factory built: same dag ids, task ids and
      dependencies, one plain ``KubernetesPodOperator`` per task with the same image, cmds, arguments, pod
      name, labels, annotations, env, pool, priority and retries, and the same DAG params as typed
      ``airflow.sdk.Param`` objects (dag-factory's ``__type__`` syntax). dag-factory sets them on the DAG
      before its tasks exist, so Airflow copies them into every task; ``build_dag`` sets them after the tasks,
      so ours do not pay that copy. Two variants:
        - "same args": the arguments are our tasks' very strings: ``--spec`` is the spec's short URI in the
          artifact store, with ``--spec-sha256``.
        - "lean": ``--spec`` is a file path instead, as a YAML author would write it; everything else is the
          same. Since the spec left the command line, the two are about the same size.
      Our per-task ``doc_md`` (the group spec) is not copied into the YAML: it is a feature of ours, and its
      cost stays on our side. dag-factory adds its own ``doc_md`` (the DAG's YAML) as it always does.

How it measures ("cold" parse)
    The dag-processor (Airflow 3.3) parses each file in a child forked from a long-lived parent that has
    Airflow imported (plus the ``airflow.*`` modules the file imports: ``parsing_pre_import_modules``) and
    its heap frozen (``gc.freeze()``); the child imports the rest (``airflow_comfy``, ``dagfactory``) and
    runs the file. This benchmark does the same: the parent imports Airflow and the KPO module once and
    freezes its heap, then every measurement runs in a fresh fork of that parent. So neither side's module state, lazy imports or in-process caches can help the other side or
    a later repetition, and neither pays Airflow's import. Running everything in one process would let
    whichever side runs first warm shared state (lazy imports, ``lru_cache``s, kubernetes client setup);
    separate ``python`` subprocesses would cost ~5 s of imports per measurement. In the child the library
    import is timed separately (reported once per file, not per DAG); the per-DAG figure is the loading
    call alone, in CPU time of the child process (``time.process_time``): on a shared machine wall time
    mostly measures the neighbours (``--verbose`` prints both).
    * cold: ``cache_dir=""`` and an empty memory cache, so every workflow is loaded, converted, validated and
      sliced. Each copy also gets a distinct marker in its ``extra`` dict (different bytes, as real
      workflows have), so no cache keyed by content can serve one copy from another.
    * empty (lean and ``--large``): ``cache_dir`` set to a folder that does not exist yet, a new one per run:
      a deployment's first parse of new files, which writes the compiled entries (and, building stub, the
      verdicts).
    * warm: the disk cache is populated during setup, the memory cache is empty (fresh fork): the
      dag-processor's steady state for unchanged files.
    Repetitions interleave the four measurements, rotating their order; medians are reported.

No timing is asserted: this is a report. The shape check is asserted: both sides must build the same dag
ids, task ids and dependencies, all tasks KubernetesPodOperators.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.5
KPO_PATH = "airflow.providers.cncf.kubernetes.operators.pod.KubernetesPodOperator"
PARAM_PATH = "airflow.sdk.Param"
COPY_MARKER = "airflow_comfy_benchmark_copy"
OPERATOR_MODULES = {"kubernetes": "airflow_comfy.operators.pod", "local": "airflow_comfy.operators.local"}


# --------------------------------------------------------------------------------------------------- forks
def in_fork(fn: Callable[[], Any], *, quiet: bool = True) -> Any:
    """Run ``fn`` in a forked child of this process and return its (JSON-able) result.

    The child's stdout/stderr go to /dev/null when ``quiet`` (dag-factory logs every file at INFO; the
    logging cost stays, as in the dag-processor, only the terminal noise goes)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        status = 0
        try:
            if quiet:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            payload = {"ok": True, "result": fn()}
        except BaseException:  # report anything, including SystemExit, to the parent
            payload = {"ok": False, "error": traceback.format_exc()}
            status = 1
        with os.fdopen(write_fd, "w") as out:
            json.dump(payload, out)
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("benchmark child died without a result")
    payload = json.loads(data)
    if not payload["ok"]:
        raise RuntimeError("benchmark child failed:\n" + payload["error"])
    return payload["result"]


# ----------------------------------------------------------------------------------------- shared helpers
def dag_shape(globals_dict: dict) -> dict[str, Any]:
    """Dag ids, task ids, dependencies and operator class check of the DAGs a loader placed in globals."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import DAG

    # by dag id: a Python DAG file may hold one DAG in two globals (e.g. the loop variable ``dag``)
    dags = {value.dag_id: value for value in globals_dict.values() if isinstance(value, DAG)}
    shape: dict[str, dict[str, list[str]]] = {}
    kpo_tasks = 0
    for dag_id, dag in dags.items():
        shape[dag_id] = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
        kpo_tasks += sum(isinstance(t, KubernetesPodOperator) for t in dag.tasks)
    return {
        "dags": len(shape),
        "tasks": sum(len(tasks) for tasks in shape.values()),
        "kpo_tasks": kpo_tasks,
        "shape": json.dumps(shape, sort_keys=True),
    }


def comfy_settings(cache_dir: str, backend: str = "kubernetes"):
    from airflow_comfy.config import get_settings

    return get_settings(cache_dir=cache_dir, backend=backend)


# ------------------------------------------------------------------------------------------------- setup
def prepare(root: Path, n: int) -> dict[str, Any]:
    """(In a fork.) Write N workflow copies and the equivalent dag-factory YAML files."""
    import warnings

    import comfyui_workflow_templates
    import yaml

    from airflow_comfy.factory import cache
    from airflow_comfy.factory.compile import dag_id_for
    from airflow_comfy.factory.loader import load_workflows
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path

    templates = Path(comfyui_workflow_templates.__file__).parent / "templates"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most templates need nodes we do not run: they are skipped
        dag_ids = set(load_workflows(templates, settings=comfy_settings("")))
    cache.clear_memory()
    sources = [p for p in sorted(templates.glob("*.json"))
               if dag_id_for(p, load_sidecar(sidecar_path(p))) in dag_ids]

    workflows, yaml_dir, lean_dir = root / "workflows", root / "yaml", root / "yaml-lean"
    for folder in (workflows, yaml_dir, lean_dir):
        folder.mkdir()
    for i in range(n):
        src = sources[i % len(sources)]
        data = json.loads(src.read_bytes())
        data.setdefault("extra", {})[COPY_MARKER] = i  # distinct content: no compile-cache hit between copies
        (workflows / f"{src.stem}__copy{i:03d}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")

    built: dict[str, Any] = {}
    # This cold load also fills the disk cache that the "warm" measurements read.
    dags = load_workflows(workflows, built, settings=comfy_settings(str(root / "cache")))
    cache.clear_memory()
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # setup speed only; dag-factory reads with its own
    for dag in dags.values():
        for folder, lean in ((yaml_dir, False), (lean_dir, True)):
            config = _dag_yaml(dag, lean)
            (folder / f"{dag.dag_id}.yaml").write_text(
                yaml.dump({dag.dag_id: config}, Dumper=dumper, sort_keys=False, width=1_000_000),
                encoding="utf-8")
    return {"templates": len(sources), **dag_shape(built)}


def _dag_yaml(dag, lean: bool) -> dict[str, Any]:
    """One dag-factory DAG config from a DAG our factory built (see the module docstring)."""
    return {
        "default_args": {"owner": dag.default_args.get("owner", "airflow")},
        "description": dag.description,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "tags": sorted(dag.tags),
        "params": {name: _param_yaml(dag.params.get_param(name)) for name in dag.params},
        "tasks": {t.task_id: _task_yaml(t, dag.dag_id, lean) for t in dag.tasks},
    }


def _param_yaml(param) -> dict[str, Any]:
    """A typed ``Param`` in dag-factory's ``__type__`` syntax: ``Param(default, description=..., **schema)``."""
    out: dict[str, Any] = {"__type__": PARAM_PATH, "__args__": [param.value]}
    if param.description:
        out["description"] = param.description
    out.update(param.schema)
    return out


def _task_yaml(task, dag_id: str, lean: bool) -> dict[str, Any]:
    arguments = list(task.arguments)
    if lean:  # what a YAML author would write: the spec as a file path, not a URI in the artifact store
        i = arguments.index("--spec") + 1
        arguments[i] = f"/opt/airflow-comfy/specs/{dag_id}/{task.task_id}.json"
    conf: dict[str, Any] = {
        "operator": KPO_PATH,
        "image": task.image,
        "cmds": list(task.cmds),
        "arguments": arguments,
        "name": task.name,
        "labels": dict(task.labels),
        "annotations": dict(task.annotations),
        "env_vars": dict(task.env_vars),  # our operator keeps them a dict (KPO builds V1EnvVar per pod)
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "termination_message_policy": task.termination_message_policy,
        "do_xcom_push": True,
        "image_pull_policy": task.image_pull_policy,
        "pool": task.pool,
        "priority_weight": task.priority_weight,
        "retries": task.retries,
        "retry_delay": task.retry_delay.total_seconds(),
    }
    if task.namespace:
        conf["namespace"] = task.namespace
    if task.upstream_task_ids:
        conf["dependencies"] = sorted(task.upstream_task_ids)
    return conf


# ---------------------------------------------------------------------------------------------- measures
def _timed(load: Callable[[dict], Any], import_s: float, serialize: bool = False) -> dict[str, Any]:
    """Run ``load(globals_dict)``; CPU time of this (child) process is the figure, wall time is kept too.
    ``serialize``: then also time the dag-processor's next step, ``DagSerialization.to_dict`` of every DAG
    (``serialize_cpu_s``, ``serialize_wall_s``)."""
    globals_dict: dict[str, Any] = {}
    c0, w0 = time.process_time(), time.perf_counter()
    load(globals_dict)
    c1, w1 = time.process_time(), time.perf_counter()
    result = {"import_s": import_s, "cpu_s": c1 - c0, "wall_s": w1 - w0, **dag_shape(globals_dict)}
    if serialize:
        from airflow.sdk import DAG
        from airflow.serialization.serialized_objects import DagSerialization

        dags = {v.dag_id: v for v in globals_dict.values() if isinstance(v, DAG)}
        c0, w0 = time.process_time(), time.perf_counter()
        for dag in dags.values():
            DagSerialization.to_dict(dag)
        result["serialize_cpu_s"], result["serialize_wall_s"] = time.process_time() - c0, time.perf_counter() - w0
    return result


def fresh_cache_dir(parent: Path) -> str:
    """(In a fork.) A cache dir that does not exist yet, unique to this child: the first parse of a deployment
    with ``[comfy] cache_dir`` set, which creates the folder on its first write. The caller removes it."""
    return str(parent / f"empty-cache-{os.getpid()}-{time.monotonic_ns()}")


def measure_comfy(workflows: Path, cache_dir: str, backend: str = "kubernetes", serialize: bool = False,
                  ) -> dict[str, Any]:
    """The building stub (``comfy_workflows.py``): ``load_workflows`` on the folder. ``cache_dir``: "" (no cache),
    a filled cache (warm), or a path that does not exist yet (the first parse, which writes the cache)."""
    t0 = time.process_time()
    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import load_workflows

    # build_group_task imports the backend's operator module on the first task: a once-per-file cost too
    importlib.import_module(OPERATOR_MODULES[backend])
    import_s = time.process_time() - t0
    settings = comfy_settings(cache_dir, backend)
    cache.clear_memory()
    return _timed(lambda g: load_workflows(workflows, g, settings=settings), import_s, serialize)


def measure_errors(workflows: Path, cache_dir: str, backend: str) -> dict[str, Any]:
    """The error stub (``comfy_workflow_errors.py``): ``find_workflow_errors`` on the folder. It builds no DAG for
    the dag-processor; a file without a verdict is compiled (or its compiled entry taken) and then planned
    (``plan_dag``: the DAG and the task settings, no operators) when a cache is set, or built whole
    (``build_dag``) when ``cache_dir`` is empty. ``cache_dir``: "" (no cache), a cache with the building stub's
    verdicts (warm), or a path that does not exist yet (the first parse: compile + plan, writing the compiled
    entries)."""
    t0 = time.process_time()
    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import find_workflow_errors

    if not cache_dir:  # without a cache it builds every task: the operator module is imported on the first one
        importlib.import_module(OPERATOR_MODULES[backend])
    import_s = time.process_time() - t0
    settings = comfy_settings(cache_dir, backend)
    cache.clear_memory()
    c0, w0 = time.process_time(), time.perf_counter()
    scan = find_workflow_errors(workflows, settings=settings)
    c1, w1 = time.process_time(), time.perf_counter()
    return {"import_s": import_s, "cpu_s": c1 - c0, "wall_s": w1 - w0, "good": len(scan.good),
            "errors": [e.summary() for e in scan.errors], "dags": len(scan.dags)}


def in_empty_cache(parent: Path, measure: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """(In a fork.) ``measure(cache_dir)`` on a cache dir of its own that does not exist yet, removed afterwards
    (untimed)."""
    cache_dir = fresh_cache_dir(parent)
    try:
        return measure(cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def measure_dagfactory(yaml_dir: Path, serialize: bool = False) -> dict[str, Any]:
    t0 = time.process_time()
    import dagfactory

    import_s = time.process_time() - t0
    folder = str(yaml_dir)
    return _timed(lambda g: dagfactory.load_yaml_dags(globals_dict=g, dags_folder=folder,
                                                      defaults_config_path=folder), import_s, serialize)


def repeat_measures(measures: dict[str, Callable[[], dict[str, Any]]], repeat: int,
                    verbose: bool) -> dict[str, list[dict[str, Any]]]:
    """Each measure ``repeat`` times, each run in a fresh fork; the order rotates every repetition."""
    names = list(measures)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    width = max(map(len, names))
    for rep in range(repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            r = in_fork(measures[name])
            results[name].append(r)
            if verbose:
                print(f"  run {rep + 1} {name:{width}s} cpu {r['cpu_s']:6.3f} s  wall {r['wall_s']:6.3f} s  "
                      f"import {r['import_s']:.3f} s")
    return results


def profile_comfy(workflows: Path, top: int) -> str:
    """(In a fork.) cProfile of one cold parse: top functions by cumulative time, ours and Airflow/KPO's."""
    import cProfile
    import io
    import pstats

    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import load_workflows

    settings = comfy_settings("")
    cache.clear_memory()
    profiler = cProfile.Profile()
    profiler.enable()
    load_workflows(workflows, {}, settings=settings)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    for label, pattern in (("airflow_comfy", r"airflow_comfy/"),
                           ("airflow / KPO / kubernetes", r"site-packages/(airflow|kubernetes)/"),
                           ("stdlib", r"python3\.\d+/(?!site-packages)")):
        out.write(f"\n=== top {top} by cumulative time: {label} ===\n")
        stats.print_stats(pattern, top)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ lean scenario
LEAN_SOURCE = Path(__file__).resolve().parents[1] / "example_workflows" / "txt2img_api.json"
#: The node whose ``text`` differs between copies: the positive prompt (CLIPTextEncode). Node "6" of this
#: file is the VAEDecode, which has no text.
LEAN_PROMPT_NODE = "2"
LEAN_IMAGE = "comfy-runner:1"
LEAN_CMDS = ["python", "-m", "airflow_comfy.runner"]
LEAN_TARGETS = {"cold": 0.8, "warm": 0.4}
#: The three cache states each stub is measured in, the target each is held to, and what each means.
CACHE_STATES = {
    "cold": ("cold", "no cache: cache_dir empty"),
    "empty": ("cold", "cache enabled but empty: the first parse, which writes it"),
    "warm": ("warm", "the disk cache of an earlier parse, fresh process"),
}
BACKENDS = ("local", "kubernetes")
HAND_WRITTEN_FILE = "hand_written_dags.py"

# What a person writes for the same DAGs: a loop over a list, two KPO tasks each, short arguments.
# Its ``arguments`` must stay equal to lean_arguments() below (setup checks it).
HAND_WRITTEN = '''"""DAGs of two KubernetesPodOperator tasks, written by hand: the floor of operator construction."""
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG

IMAGE = "comfy-runner:1"
CMDS = ["python", "-m", "airflow_comfy.runner"]
DAGS = __DAGS__  # (dag id, first task, second task)


def arguments(dag_id, task_id):
    return ["run", "--spec", f"/specs/{dag_id}/{task_id}.json", "--store", "s3://comfy/artifacts",
            "--run-key", "{{ run_id }}", "--models", "/models", "--xcom-path", "/airflow/xcom/return.json"]


for dag_id, first, second in DAGS:
    with DAG(dag_id=dag_id, schedule=None, catchup=False, default_args={"owner": "airflow"}) as dag:
        a = KubernetesPodOperator(task_id=first, image=IMAGE, cmds=CMDS, arguments=arguments(dag_id, first))
        b = KubernetesPodOperator(task_id=second, image=IMAGE, cmds=CMDS, arguments=arguments(dag_id, second))
        a >> b
    globals()[dag_id] = dag
'''


def lean_arguments(dag_id: str, task_id: str) -> list[str]:
    """About ten short strings, as a YAML author would write the runner's command line."""
    return ["run", "--spec", f"/specs/{dag_id}/{task_id}.json", "--store", "s3://comfy/artifacts",
            "--run-key", "{{ run_id }}", "--models", "/models", "--xcom-path", "/airflow/xcom/return.json"]


def write_copies(folder: Path, n: int) -> None:
    """N copies of ``txt2img_api.json`` that differ only in the prompt text (so no two share a cache key)."""
    data = json.loads(LEAN_SOURCE.read_bytes())
    prompt = data[LEAN_PROMPT_NODE]["inputs"]["text"]
    folder.mkdir(parents=True)
    for i in range(n):
        data[LEAN_PROMPT_NODE]["inputs"]["text"] = f"{prompt}, variant {i}"
        (folder / f"{LEAN_SOURCE.stem}_{i:04d}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")


def prepare_lean(lean: Path, n: int) -> dict[str, Any]:
    """(In a fork.) The copies, their disk cache, and the two baselines that build the same DAGs:
    dag-factory YAML files (one DAG each) and one hand-written Python DAG file."""
    import yaml

    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import load_workflows

    write_copies(lean / "workflows", n)
    # These cold loads also fill the disk caches that the "warm" measurements read: one per backend, since the
    # key covers the settings and each building stub prunes the entries of other keys from its folder's cache.
    # They write the verdicts too, which the error stub's warm runs read.
    shapes = {}
    for backend in BACKENDS:
        built: dict[str, Any] = {}
        load_workflows(lean / "workflows", built, settings=comfy_settings(lean_cache(lean, backend), backend))
        cache.clear_memory()
        shapes[backend] = dag_shape(built)
    assert shapes["local"]["shape"] == shapes["kubernetes"]["shape"], "the backends built different DAGs"
    shape = shapes["kubernetes"]
    chains = []
    for dag_id, tasks in json.loads(shape["shape"]).items():
        first, second = sorted(tasks, key=lambda t: len(tasks[t]))
        assert len(tasks) == 2 and tasks[first] == [] and tasks[second] == [first], (dag_id, tasks)
        chains.append((dag_id, first, second))
    assert len(chains) == n, f"{len(chains)} of {n} copies became DAGs"

    (lean / "yaml").mkdir()
    for dag_id, first, second in chains:
        config = {"default_args": {"owner": "airflow"}, "catchup": False,
                  "tasks": {first: _lean_task_yaml(dag_id, first, None),
                            second: _lean_task_yaml(dag_id, second, first)}}
        (lean / "yaml" / f"{dag_id}.yaml").write_text(yaml.safe_dump({dag_id: config}, sort_keys=False),
                                                      encoding="utf-8")

    (lean / "hand").mkdir()
    hand = lean / "hand" / HAND_WRITTEN_FILE
    hand.write_text(HAND_WRITTEN.replace("__DAGS__", json.dumps(chains, indent=0)), encoding="utf-8")
    module = _exec_file(hand)  # also writes its .pyc, as the dag-processor's earlier parses would have
    dag_id, first, _ = chains[0]
    assert module[dag_id].get_task(first).arguments == lean_arguments(dag_id, first), "hand-written args differ"
    return shape


def lean_cache(lean: Path, backend: str) -> str:
    """The disk cache of one backend's warm runs."""
    return str(lean / f"cache-{backend}")


def _lean_task_yaml(dag_id: str, task_id: str, upstream: str | None) -> dict[str, Any]:
    conf: dict[str, Any] = {"operator": KPO_PATH, "image": LEAN_IMAGE, "cmds": LEAN_CMDS,
                            "arguments": lean_arguments(dag_id, task_id)}
    if upstream:
        conf["dependencies"] = [upstream]
    return conf


def _exec_file(path: Path) -> dict[str, Any]:
    """Run a Python DAG file the way the DagBag imports one; returns its globals."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"unusual_prefix_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module)


def measure_hand_written(path: Path, serialize: bool = False) -> dict[str, Any]:
    return _timed(lambda g: g.update(_exec_file(path)), 0.0, serialize)


def run_lean(root: Path, args: argparse.Namespace) -> None:
    n = args.n or 200
    lean = root / "lean"
    lean.mkdir()
    info = in_fork(lambda: prepare_lean(lean, n))
    workflows = lean / "workflows"
    print(f"\nlean: {n} copies of {LEAN_SOURCE.name} (prompts differ) -> {info['dags']} DAGs of "
          f"{info['tasks'] // info['dags']} tasks. dag-factory YAML and a hand-written Python file build the "
          "same dag ids, task ids and dependencies with plain KubernetesPodOperators and short arguments.")
    measures: dict[str, Callable[..., dict[str, Any]]] = {}
    for backend in BACKENDS:
        warm_cache = lean_cache(lean, backend)
        measures[f"{backend} cold"] = lambda serialize=False, b=backend: measure_comfy(workflows, "", b, serialize)
        measures[f"{backend} empty"] = lambda b=backend: in_empty_cache(
            lean, lambda c: measure_comfy(workflows, c, b))
        measures[f"{backend} warm"] = lambda serialize=False, b=backend, c=warm_cache: measure_comfy(
            workflows, c, b, serialize)
        measures[f"errors {backend} cold"] = lambda b=backend: measure_errors(workflows, "", b)
        measures[f"errors {backend} empty"] = lambda b=backend: in_empty_cache(
            lean, lambda c: measure_errors(workflows, c, b))
        measures[f"errors {backend} warm"] = lambda b=backend, c=warm_cache: measure_errors(workflows, c, b)
    measures["dag-factory lean"] = lambda serialize=False: measure_dagfactory(lean / "yaml", serialize)
    measures["hand-written"] = lambda serialize=False: measure_hand_written(lean / "hand" / HAND_WRITTEN_FILE,
                                                                             serialize)
    results = repeat_measures(measures, args.repeat, args.verbose)
    for name, runs in results.items():
        for r in runs:
            if name.startswith("errors"):  # every file is good: no error, no DAG handed to Airflow
                assert (r["good"], r["errors"], r["dags"]) == (info["dags"], [], 0), (name, r["good"], r["errors"])
                continue
            assert r["shape"] == info["shape"], f"{name}: dag ids / task ids / dependencies differ"
            expected_kpo = 0 if name.startswith("local") else info["tasks"]
            assert r["kpo_tasks"] == expected_kpo, (name, r["kpo_tasks"], expected_kpo)

    ms = {name: statistics.median(r["cpu_s"] for r in runs) * 1000 / info["dags"]
          for name, runs in results.items()}
    df, hand = ms["dag-factory lean"], ms["hand-written"]

    def ratio(value: float, state: str) -> str:
        over = value / df > LEAN_TARGETS[CACHE_STATES[state][0]]
        return f"{value / df:.2f}x{' (over)' if over else ''}"

    def states(prefix: str) -> str:
        return "   ".join(f"{state} {ms[f'{prefix} {state}']:5.2f}" for state in CACHE_STATES)

    print(f"lean parse, ms/DAG (median CPU time of {args.repeat} runs, each in a fresh fork; imports not counted); "
          + "; ".join(f"{state}: {meaning}" for state, (_, meaning) in CACHE_STATES.items()) + ":")
    for backend in BACKENDS:
        print(f"  {'building stub, backend ' + backend:35s}{states(backend)}   (load_workflows)")
    print(f"  {'dag-factory 1.1.0, lean YAML':35s}{df:10.2f}   (2 plain KPO, short args, a >> b)")
    print(f"  {'hand-written Python DAG file':35s}{hand:10.2f}   (the floor: DAG + 2 KPO + a >> b)")
    targets = ", ".join(f"{kind} <= {target}x" for kind, target in LEAN_TARGETS.items())
    print(f"lean ratios: building stub / dag-factory lean (target {targets}; empty is held to the cold target); "
          "/ hand-written:")
    for backend in BACKENDS:
        cells = ", ".join(f"{state} {ratio(ms[f'{backend} {state}'], state)}" for state in CACHE_STATES)
        hand_cells = ", ".join(f"{state} {ms[f'{backend} {state}'] / hand:.2f}x" for state in CACHE_STATES)
        print(f"  {backend:10s}  vs dag-factory: {cells:45s} vs hand-written: {hand_cells}")
    print("error stub (find_workflow_errors on the same folder: defines no DAG; a file without a verdict is compiled "
          "and planned, no operators, when a cache is set, or built whole when cache_dir is empty), ms/DAG:")
    for backend in BACKENDS:
        print(f"  {'error stub, backend ' + backend:35s}{states('errors ' + backend)}   (cold: full build_dag; "
              "empty: compile + plan_dag; warm: the verdict)")
    print("per parse loop, both stubs (the dag-processor parses both files every loop), ms/DAG, and / dag-factory "
          "lean (same targets). cold: every loop without a cache; empty: each stub alone on an empty cache (an upper "
          "bound of the first loop: the stub that parses second finds the other's entries); warm: every loop after:")
    for backend in BACKENDS:
        cells = []
        for state in CACHE_STATES:
            ours, errors = ms[f"{backend} {state}"], ms[f"errors {backend} {state}"]
            cells.append(f"{state} {ours:.2f} + {errors:.2f} = {ours + errors:5.2f}: {ratio(ours + errors, state):11s}")
        print(f"  {backend:10s}  " + "   ".join(cells))
    imports = {name: statistics.median(r["import_s"] for r in runs) * 1000 for name, runs in results.items()}
    print(f"library import, once per file parse (each stub file pays its own): building stub local "
          f"{imports['local cold']:.0f} ms, kubernetes {imports['kubernetes cold']:.0f} ms; error stub "
          f"{imports['errors kubernetes warm']:.0f} ms (cold, without a cache, with the operator module: "
          f"{imports['errors kubernetes cold']:.0f} ms); dag-factory {imports['dag-factory lean']:.0f} ms")
    if args.serialize:
        serialized = {name: in_fork(lambda name=name: measures[name](serialize=True))
                      for name in ("local warm", "kubernetes warm", "dag-factory lean", "hand-written")}
        print("then the dag-processor serializes every DAG the building stub made (DagSerialization.to_dict, inside "
              "the same dag_file_processor_timeout; CPU ms/DAG, one run each, not in the ratios above):\n  "
              + ", ".join(f"{name.replace(' warm', '')} {r['serialize_cpu_s'] * 1000 / r['dags']:.2f}"
                          for name, r in serialized.items()))
    if args.split:
        run_split(lean, args, ms)
    if args.profile:
        for kind, cache in (("cold", ""), ("warm", lean_cache(lean, args.profile_backend))):
            print(f"\ncProfile of one lean {kind} parse, backend {args.profile_backend}:")
            print(in_fork(lambda c=cache: profile_lean(workflows, c, args.profile_backend, 25)))


# ------------------------------------------------------------------------------------------ cost split
#: (key, label) of the phases cost_split() times per file, in the order of the table.
SPLIT_PHASES = (
    ("read", "read (sidecar, dag id, read_workflow_file)"),
    ("cache key", "cache key (cache_key: sha256)"),
    ("verdict read", "verdict read (_raise_known_error)"),
    ("compiled read", "compiled read (file bytes)"),
    ("decode", "JSON decode + CompiledWorkflow.from_dict"),
    ("parse", "parse/convert (parse_workflow_text)"),
    ("validate", "validate"),
    ("slice", "slice (slice_workflow)"),
    ("params", "params (discover_params)"),
    ("spec", "spec (GroupGraph.specs, to_dict, sha256)"),
    ("docs", "docs (workflow_doc_md)"),
    ("compiled write", "compiled write (put_compiled)"),
    ("claim", "dag id claim (_claim)"),
    ("DAG", "plan_dag without groups: checks, DAG(...)"),
    ("task configs", "task configs (from_dict, task_config_for)"),
    ("operators", "operators (build_group_task)"),
    ("dependencies", "dependencies (a >> b)"),
    ("params assignment", "dag.params (+ tier_param), last"),
    ("verdict write", "verdict (has_verdict, put_verdict)"),
)
#: The split's columns: (building stub?, backend, cache state: a key of CACHE_STATES) by column name; the name
#: of the lean measurement of the same call is SPLIT_WHOLE[column].
SPLIT_COLUMNS = {
    "local cold": (True, "local", "cold"), "local warm": (True, "local", "warm"),
    "k8s cold": (True, "kubernetes", "cold"), "k8s empty": (True, "kubernetes", "empty"),
    "k8s warm": (True, "kubernetes", "warm"),
    "err cold": (False, "kubernetes", "cold"), "err empty": (False, "kubernetes", "empty"),
    "err warm": (False, "kubernetes", "warm"),
}
SPLIT_LABEL, SPLIT_WIDTH = 42, 11
SPLIT_WHOLE = {name: ("" if build else "errors ") + f"{backend} {state}"
               for name, (build, backend, state) in SPLIT_COLUMNS.items()}


def cost_split(workflows: Path, cache_dir: str, backend: str, build: bool = True) -> dict[str, dict[str, float]]:
    """(In a fork.) One stub's work on the folder, file by file, with a CPU timer around each phase:
    ``load_workflows`` when ``build`` (``_build_file``), else ``find_workflow_errors`` (``_check_file``: a file
    with a verdict stops after the verdict read; one without is compiled, or its compiled entry taken, then
    planned (``plan_dag``) when a cache is set, or built whole (``build_dag``, the DAG dropped) when
    ``cache_dir`` is empty). Returns ``{"rest": {phase: seconds summed over files 2..N, "files": N - 1},
    "first": {phase: seconds of the first file}, "once": {"once": catalog, pools, context and file list},
    "prune": {"prune": the building stub's cache prune, once per folder}}``. The first file is apart because it
    pays the lazy imports and first-use initialisation (Airflow imports its timetables on the first DAG, the
    loader reads the DAG defaults from Airflow's configuration once, the store object of the spec URI is made
    once).

    It calls the package's own functions in the order ``factory/loader.py`` (``scan_workflows``,
    ``_scan_one``, ``_build_file`` / ``_check_file``, ``build_dag`` = ``plan_dag`` + operators + dependencies +
    params), ``factory/cache.py`` (``ParseCache.compiled``, ``verdict``, ``has_verdict``) and
    ``factory/compile.py`` (``compile_workflow``) do, without patching them: when those change shape, this
    function is the one to adapt. Error handling is left out (every benchmark file is good): a cached
    verdict must be True."""
    import dataclasses
    import hashlib

    from airflow_comfy.factory import cache as cache_module
    from airflow_comfy.factory.compile import CompiledWorkflow, cache_key, dag_id_for
    from airflow_comfy.factory.docs import workflow_doc_md
    from airflow_comfy.factory.loader import (
        _build_context,
        _claim,
        _param,
        _workflow_files,
        plan_dag,
        task_config_for,
    )
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
    from airflow_comfy.operators.build import build_group_task
    from airflow_comfy.scheduling.pools import load_pools
    from airflow_comfy.scheduling.tiers import TIER_PARAM, tier_param
    from airflow_comfy.workflow.catalog import load_catalog
    from airflow_comfy.workflow.groupspec import GroupSpec
    from airflow_comfy.workflow.loader import parse_workflow_text, read_workflow_file
    from airflow_comfy.workflow.params import bindings, discover_params
    from airflow_comfy.workflow.slicing import slice_workflow
    from airflow_comfy.workflow.validate import validate

    if build or not cache_dir:  # a once-per-file import, not a phase; an error stub with a cache builds no task
        importlib.import_module(OPERATOR_MODULES[backend])
    settings = comfy_settings(cache_dir, backend)
    cache_module.clear_memory()
    clock = time.process_time
    spent: dict[str, dict[str, float]] = {"once": {}, "first": {}, "rest": {}, "prune": {}}
    bucket = spent["once"]
    last = clock()

    def lap(phase: str) -> None:
        nonlocal last
        now = clock()
        bucket[phase] = bucket.get(phase, 0.0) + now - last
        last = now

    # scan_workflows, before its loop
    catalog = load_catalog(settings.object_info_files)
    catalog.fingerprint()  # memoized: the first cache_key() would pay it
    pools = load_pools(settings.pools_file)
    store = cache_module.ParseCache(settings.cache_dir or None, workflows)
    context = _build_context(settings, pools)
    used_keys: set[str] = set()
    claimed: dict[str, Path] = {}
    files = _workflow_files(workflows, [])
    lap("once")
    for index, path in enumerate(files):
        bucket = spent["first" if index == 0 else "rest"]
        # _scan_one
        sidecar = load_sidecar(sidecar_path(path))
        dag_id = dag_id_for(path, sidecar)
        content = read_workflow_file(path, settings.max_workflow_bytes)
        lap("read")
        key = cache_key(content, sidecar, catalog, str(path), context)
        used_keys.add(key)
        lap("cache key")
        if not build:  # _check_file: the verdict first (_raise_known_error)
            verdict = store.verdict(key)
            assert verdict is None or verdict is True, verdict
            lap("verdict read")
            if verdict is True:
                _claim(dag_id, path, claimed)
                claimed[dag_id] = path  # scan_workflows: scan.good
                lap("claim")
                continue
        # ParseCache.compiled in two steps (its memory layer is empty in a fresh fork; a missing file is a miss)
        cached = None
        if store.root is not None:
            try:
                raw = (store.root / (key + cache_module.COMPILED_SUFFIX)).read_bytes()
            except OSError:
                raw = None
            lap("compiled read")
            if raw is not None:
                cached = json.loads(raw)
                cache_module._remember(key, cached)
        if cached is not None:
            compiled = CompiledWorkflow.from_dict(cached)
            lap("decode")
        else:
            if build:  # _build_file: a file known to be bad is not compiled again
                verdict = store.verdict(key)
                assert verdict is None or verdict is True, verdict
                lap("verdict read")
            # compile_workflow, phase by phase
            source, name = str(path), path.name[: -len(".json")]
            workflow = parse_workflow_text(content, catalog, name=name, source=source,
                                           max_nodes=settings.max_workflow_nodes)
            lap("parse")
            workflow = validate(workflow, catalog)
            lap("validate")
            graph = slice_workflow(workflow, catalog, mode=sidecar.slicing, assignment=sidecar.groups or None)
            lap("slice")
            params = discover_params(workflow, catalog, auto=sidecar.auto_params, declared=sidecar.params)
            lap("params")
            sha = hashlib.sha256(content).hexdigest()
            metadata = {"prompt": workflow.to_api(), "workflow": workflow.ui_workflow}
            specs = graph.specs(workflow_sha256=sha, params=bindings(params), metadata=metadata)
            groups = [{"task_id": s.group, "title": g.title, "upstream": list(s.upstream), "spec": s.to_dict(),
                       "spec_sha256": s.sha256()} for s, g in zip(specs, graph.groups, strict=True)]
            lap("spec")
            dag_id = dag_id_for(path, sidecar)
            doc_md = workflow_doc_md(graph, params, sidecar, dag_id=dag_id)
            lap("docs")
            compiled = CompiledWorkflow(
                dag_id=dag_id, name=name, source=source, sha256=sha, mode=graph.mode,
                groups=groups, doc_md=doc_md,
                params=[{"name": p.name, "title": p.title, "description": p.description, "schema": p.schema,
                         "default": p.default} for p in params])
            store.put_compiled(key, compiled.to_dict())
            lap("compiled write")
        _claim(compiled.dag_id, path, claimed)
        claimed[compiled.dag_id] = path  # scan_workflows: scan.good
        lap("claim")
        # plan_dag: its checks and the DAG (run on the workflow without its groups), then each group's settings
        plan = plan_dag(dataclasses.replace(compiled, groups=[]), sidecar, settings, pools=pools)
        dag = plan.dag
        lap("DAG")
        planned = []
        for group in compiled.groups:
            spec = GroupSpec.from_dict(group["spec"])
            planned.append((group, spec, task_config_for(sidecar, group["task_id"], settings, spec=spec, pools=pools,
                                                         default_tier=plan.default_tier)))
        lap("task configs")
        if not build and store.root is not None:  # the error stub with a cache stops at the plan
            continue
        # the rest of build_dag: the operators, their dependencies, then the params
        tasks = {}
        for group, spec, task_config in planned:
            tasks[group["task_id"]] = build_group_task(spec, task_config=task_config, settings=settings,
                                                       upstream_task_ids=group["upstream"], dag=dag,
                                                       spec_sha256=group["spec_sha256"])
        lap("operators")
        for group in compiled.groups:
            for upstream in group["upstream"]:
                tasks[upstream] >> tasks[group["task_id"]]
        lap("dependencies")
        dag.params = {**{p["name"]: _param(p) for p in compiled.params},
                      TIER_PARAM: tier_param(plan.default_tier, settings.tier_weights)}
        lap("params assignment")
        if build and not store.has_verdict(key):  # back in _build_file
            store.put_verdict(key, True)
        lap("verdict write")
    bucket = spent["prune"]
    if build:
        store.prune(used_keys)
    lap("prune")
    spent["rest"]["files"] = len(files) - 1
    return spent


#: (key, label) of operator_detail()'s rows. "ref" rows build other objects on the same workflows, for comparison.
DETAIL_ROWS = (
    ("dag", "plan_dag without groups (checks, the DAG tasks join)"),
    ("dag params", "dag.params = params + tier_param (after the tasks)"),
    ("dag bare", "ref: DAG(dag_id, schedule=None)"),
    ("task_config", "GroupSpec.from_dict + task_config_for (pool, tier)"),
    ("task_kwargs", "task_kwargs (BaseOperator kwargs, with doc_md)"),
    ("doc_md", "  of which spec_doc_md (timed again, alone)"),
    ("arguments", "runner_arguments (spec URI from the sha256)"),
    ("backend_kwargs", "group_pod_kwargs (k8s) / group_needs_gpu (local)"),
    ("init", "our operator's __init__, on our DAG (no params yet)"),
    ("init params", "ref: the same __init__ on a DAG with its params"),
    ("ref parent", "ref: its parent class, given what ours passes it"),
    ("ref kpo", "ref: plain KPO, lean args, on our DAG"),
    ("ref base", "ref: BaseOperator(task_id), on our DAG"),
)


def _pod_parent_kwargs(arguments: list[str], pod_kwargs: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """What ``ComfyGroupPodOperator.__init__`` hands ``KubernetesPodOperator.__init__`` (mirrors
    ``operators/pod.py``): its own arguments taken out, the scratch env, volume and security contexts added."""
    from kubernetes.client import models as k8s

    from airflow_comfy.operators import pod as pod_module
    from airflow_comfy.operators.command import pod_arguments

    config = pod_module._K8S_CONFIGURATION
    kwargs = {**pod_kwargs, **common}
    for own in ("pod_disruption_restarts", "avoid_failed_nodes"):
        kwargs.pop(own, None)
    env = {**pod_module.SCRATCH_ENV, **(kwargs.pop("env_vars", None) or {}), "HF_HUB_OFFLINE": "1"}
    kwargs.setdefault("security_context", pod_module.pod_security_context())
    kwargs.setdefault("container_security_context", pod_module.container_security_context())
    kwargs.setdefault("xcom_sidecar_container_security_context", pod_module.container_security_context())
    volumes, mounts = list(kwargs.pop("volumes", None) or []), list(kwargs.pop("volume_mounts", None) or [])
    if not any(pod_module._field(m, "mount_path", "mountPath") == pod_module.SCRATCH_PATH for m in mounts):
        volumes.append(k8s.V1Volume(name=pod_module.SCRATCH_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(
            local_vars_configuration=config), local_vars_configuration=config))
        mounts.append(k8s.V1VolumeMount(name=pod_module.SCRATCH_VOLUME, mount_path=pod_module.SCRATCH_PATH,
                                        local_vars_configuration=config))
    kwargs.setdefault("get_logs", True)
    kwargs.setdefault("on_finish_action", "delete_pod")
    kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")
    return {"cmds": list(pod_module.POD_RUNNER_CMDS), "arguments": pod_arguments(arguments),
            "env_vars": [k8s.V1EnvVar(name=name, value=value, local_vars_configuration=config)
                         for name, value in env.items()],
            "do_xcom_push": True, "volumes": volumes, "volume_mounts": mounts, **kwargs}


def operator_detail(workflows: Path, cache_dir: str, backend: str) -> dict[str, float]:
    """(In a fork.) What one DAG and one task of ``build_dag`` / ``build_group_task`` cost, step by step
    (mirroring ``factory/loader.py``'s ``plan_dag`` and ``operators/build.py``'s ``_pod_task`` /
    ``_local_task``), and what simpler DAGs and operators cost on the same workflows. "Our DAG" is ``plan_dag``
    of the workflow without its groups: what the tasks join, since ``build_dag`` sets the params (the
    workflow's and ``tier``) after building them (a DAG that has params when a task joins it is deep-copied
    into the task at every class level: the "with its params" row). The compiled workflows come from
    ``cache_dir``, the disk cache of ``backend`` (untimed). Returns seconds: ``dag*`` rows summed over the DAGs
    (``dags``), the other rows over the tasks (``tasks``), of files 2..N (the first pays lazy imports, see
    cost_split)."""
    import dataclasses

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import DAG, BaseOperator

    from airflow_comfy.factory.cache import ParseCache
    from airflow_comfy.factory.compile import CompiledWorkflow, cache_key
    from airflow_comfy.factory.loader import (
        _build_context,
        _param,
        _workflow_files,
        plan_dag,
        task_config_for,
    )
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
    from airflow_comfy.operators.build import spec_doc_md, task_kwargs
    from airflow_comfy.operators.command import runner_arguments
    from airflow_comfy.operators.devices import group_needs_gpu
    from airflow_comfy.operators.local import ComfyGroupLocalOperator
    from airflow_comfy.operators.pod import ComfyGroupPodOperator, group_pod_kwargs, pod_models_path
    from airflow_comfy.scheduling.pools import load_pools
    from airflow_comfy.scheduling.tiers import TIER_PARAM, tier_param
    from airflow_comfy.workflow.catalog import load_catalog
    from airflow_comfy.workflow.groupspec import GroupSpec
    from airflow_comfy.workflow.loader import read_workflow_file

    settings = comfy_settings(cache_dir, backend)
    catalog, store = load_catalog(settings.object_info_files), ParseCache(cache_dir, workflows)
    pools = load_pools(settings.pools_file)
    context = _build_context(settings, pools)
    clock = time.process_time
    spent: dict[str, float] = {}
    for index, path in enumerate(_workflow_files(workflows, [])):
        if index <= 1:  # start (again) after the first file
            spent = {key: 0.0 for key, _ in DETAIL_ROWS} | {"dags": 0, "tasks": 0}
        sidecar = load_sidecar(sidecar_path(path))
        content = read_workflow_file(path, settings.max_workflow_bytes)
        cached = store.compiled(cache_key(content, sidecar, catalog, str(path), context))
        assert cached is not None, f"{path.name}: not in the disk cache {cache_dir}"
        compiled = CompiledWorkflow.from_dict(cached)

        def ours(suffix: str, compiled: Any = compiled, sidecar: Any = sidecar) -> Any:
            return plan_dag(dataclasses.replace(compiled, dag_id=compiled.dag_id + suffix, groups=[]), sidecar,
                            settings, pools=pools)

        def trigger_params(default_tier: str, compiled: Any = compiled) -> dict[str, Any]:
            return {**{p["name"]: _param(p) for p in compiled.params},
                    TIER_PARAM: tier_param(default_tier, settings.tier_weights)}

        t0 = clock()
        plan = ours("")
        t1 = clock()
        dag, default_tier = plan.dag, plan.default_tier
        with_params = ours("_params").dag  # untimed
        t2 = clock()
        with_params.params = trigger_params(default_tier)
        t3 = clock()
        DAG(dag_id=compiled.dag_id + "_bare", schedule=None)
        t4 = clock()
        spent["dag"] += t1 - t0
        spent["dag params"] += t3 - t2
        spent["dag bare"] += t4 - t3
        spent["dags"] += 1
        # untimed: the DAGs the other operators go to (one per kind: task ids repeat)
        ref_dags = {kind: ours(f"_{kind}").dag for kind in ("kpo", "base", "parent")}
        for group in compiled.groups:
            t0 = clock()
            spec = GroupSpec.from_dict(group["spec"])
            task_config = task_config_for(sidecar, group["task_id"], settings, spec=spec, pools=pools,
                                          default_tier=default_tier)
            t1 = clock()
            args = lean_arguments(compiled.dag_id, spec.group)
            sha = group["spec_sha256"]
            t2 = clock()
            common = task_kwargs(spec, task_config=task_config, settings=settings, task_id=None, dag=dag)
            t3 = clock()
            spec_doc_md(spec)
            t4 = clock()
            if backend == "kubernetes":
                arguments = runner_arguments(spec, store=settings.artifact_store, models_path=pod_models_path(settings),
                                             input_path=settings.pod_input_path, upstream_task_ids=group["upstream"],
                                             spec_sha256=sha)
                t5 = clock()
                pod_kwargs = group_pod_kwargs(spec, task_config=task_config, settings=settings,
                                              dag_id=compiled.dag_id)
                t6 = clock()
                make = functools.partial(ComfyGroupPodOperator, arguments=arguments, group_spec=spec,
                                         spec_sha256=sha, store=settings.artifact_store,
                                         aws_conn_id=settings.aws_conn_id or None, **pod_kwargs, **common)
                # what ComfyGroupPodOperator.__init__ hands KubernetesPodOperator.__init__ (built untimed)
                parent = functools.partial(KubernetesPodOperator, **_pod_parent_kwargs(arguments, pod_kwargs, common))
            else:
                arguments = runner_arguments(spec, store=settings.artifact_store, models_path=settings.models_path,
                                             input_path=settings.input_path, upstream_task_ids=group["upstream"],
                                             spec_sha256=sha)
                t5 = clock()
                needs_gpu = group_needs_gpu(spec)
                t6 = clock()
                make = functools.partial(ComfyGroupLocalOperator, arguments=arguments,
                                         runner_python=settings.runner_python or None, runner_command=None,
                                         env=dict(task_config.env), aws_conn_id=settings.aws_conn_id or None,
                                         group_spec=spec, spec_sha256=sha, store=settings.artifact_store,
                                         needs_gpu=needs_gpu, **common)
                parent = functools.partial(BaseOperator, **common)  # ComfyGroupLocalOperator: super().__init__(**kwargs)
            for key, seconds in (("task_config", t1 - t0), ("task_kwargs", t3 - t2), ("doc_md", t4 - t3),
                                 ("arguments", t5 - t4), ("backend_kwargs", t6 - t5)):
                spent[key] += seconds
            # The operators, in an order that rotates from task to task: a garbage collection falls on whichever
            # construction crosses the allocation threshold, so a fixed order would bill it to the same row.
            builds = [("init", functools.partial(make, dag=dag)),
                      ("init params", functools.partial(make, dag=with_params)),
                      ("ref parent", functools.partial(parent, dag=ref_dags["parent"])),
                      ("ref kpo", functools.partial(KubernetesPodOperator, task_id=spec.group, image=LEAN_IMAGE,
                                                    cmds=LEAN_CMDS, arguments=args, dag=ref_dags["kpo"])),
                      ("ref base", functools.partial(BaseOperator, task_id=spec.group, dag=ref_dags["base"]))]
            shift = spent["tasks"] % len(builds)
            for key, build in builds[shift:] + builds[:shift]:
                t0 = clock()
                build()
                spent[key] += clock() - t0
            spent["tasks"] += 1
    return spent


def _focus_functions(backend: str) -> list[tuple[str, Any]]:
    """(label, function) of the functions whose cumulative time the lean profile lists per DAG."""
    import copy

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import DAG, BaseOperator, Param
    from airflow.sdk.bases import operator as base_operator
    from airflow.sdk.definitions.param import ParamsDict
    from kubernetes.client import models as k8s

    from airflow_comfy.factory import compile as compile_module
    from airflow_comfy.factory import loader
    from airflow_comfy.factory.cache import ParseCache
    from airflow_comfy.operators import build, command
    from airflow_comfy.scheduling import pools, tiers
    from airflow_comfy.workflow.groupspec import GroupSpec

    ours = importlib.import_module(OPERATOR_MODULES[backend])
    our_class = ours.ComfyGroupPodOperator if backend == "kubernetes" else ours.ComfyGroupLocalOperator
    return [
        ("load_workflows", loader.load_workflows),
        ("  _scan_one", loader._scan_one),
        ("    read_workflow_file", loader.read_workflow_file),
        ("    cache_key", compile_module.cache_key),
        ("    _build_file", loader._build_file),
        ("      ParseCache.compiled (warm: file read + JSON decode)", ParseCache.compiled),
        ("      ParseCache.verdict (cold only: file read + decode)", ParseCache.verdict),
        ("      compile_workflow (cold only)", compile_module.compile_workflow),
        ("        GroupSpec.sha256 (cold only)", GroupSpec.sha256),
        ("      ParseCache.put_compiled (cold)", ParseCache.put_compiled),
        ("      build_dag", loader.build_dag),
        ("        plan_dag", loader.plan_dag),
        ("          DAG.__init__ (attrs)", DAG.__init__),
        ("          GroupSpec.from_dict", GroupSpec.from_dict),
        ("          task_config_for", loader.task_config_for),
        ("            assign_pool", pools.assign_pool),
        ("        build_group_task", build.build_group_task),
        ("          spec_doc_md", build.spec_doc_md),
        ("          runner_arguments", command.runner_arguments),
        ("          apply_defaults wrapper (outermost call)", KubernetesPodOperator.__init__),
        (f"            {our_class.__name__}.__init__ (with super())", our_class.__init__.__wrapped__),
        ("            KubernetesPodOperator.__init__ (with super())", KubernetesPodOperator.__init__.__wrapped__),
        ("            BaseOperator.__init__", BaseOperator.__init__.__wrapped__),
        ("            get_merged_defaults (each level)", base_operator.get_merged_defaults),
        ("              ParamsDict.__deepcopy__ (DAG params)", ParamsDict.__deepcopy__),
        ("            BaseOperator.__setattr__", BaseOperator.__setattr__),
        ("            _set_xcomargs_dependencies", BaseOperator._set_xcomargs_dependencies),
        ("            V1EnvVar.__init__", k8s.V1EnvVar.__init__),
        ("        Param.__init__ (DAG params, tier too)", Param.__init__),
        ("        tier_param", tiers.tier_param),
        ("      ParseCache.has_verdict (a stat)", ParseCache.has_verdict),
        ("      ParseCache.put_verdict (first parse)", ParseCache.put_verdict),
        ("  ParseCache.prune", ParseCache.prune),
        ("copy.deepcopy (all callers)", copy.deepcopy),
    ]


def profile_lean(workflows: Path, cache_dir: str, backend: str, top: int) -> str:
    """(In a fork.) cProfile of one lean parse: top ``top`` functions by cumulative and by own time, then the
    cumulative time per DAG of the functions of _focus_functions() (profiler overhead included)."""
    import cProfile
    import inspect
    import io
    import pstats

    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import load_workflows

    importlib.import_module(OPERATOR_MODULES[backend])
    settings = comfy_settings(cache_dir, backend)
    cache.clear_memory()
    built: dict[str, Any] = {}
    profiler = cProfile.Profile()
    profiler.enable()
    load_workflows(workflows, built, settings=settings)
    profiler.disable()
    dags = len([k for k in built if k.startswith("comfy_dag__")])
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for key in ("cumulative", "tottime"):
        out.write(f"=== top {top} by {key} time ===\n")
        stats.sort_stats(key).print_stats(top)
    raw = stats.stats  # {(file, line, name): (primitive calls, calls, own time, cumulative time, callers)}
    total = max(ct for _, _, _, ct, _ in raw.values())
    out.write(f"=== selected functions: cumulative ms per DAG ({dags} DAGs; cProfile's overhead inflates "
              "functions that make many small calls, e.g. deepcopy) ===\n")
    out.write(f"  {'function':62s}{'ms/DAG':>8s}{'calls/DAG':>11s}{'share':>8s}\n")
    for label, function in _focus_functions(backend):
        code = getattr(inspect.unwrap(function) if function is not None and "wrapper" not in label else function,
                       "__code__", None)
        row = raw.get((code.co_filename, code.co_firstlineno, code.co_name)) if code else None
        if row is None:
            out.write(f"  {label:62s}{'-':>8s}\n")
            continue
        _, calls, _, cumulative, _ = row
        out.write(f"  {label:62s}{cumulative / dags * 1000:8.3f}{calls / dags:11.2f}{cumulative / total:8.0%}\n")
    text = out.getvalue()
    for prefix in (str(Path(sys.prefix) / "lib"), str(Path(sys.base_prefix) / "lib"), str(Path.cwd()) + "/"):
        text = text.replace(prefix, "")
    return text


def run_split(lean: Path, args: argparse.Namespace, whole_ms: dict[str, float]) -> None:
    """Print cost_split()'s table (us/DAG) for both stubs in their three cache states, and operator_detail()'s
    (us/task). ``whole_ms``: the lean measurements' ms/DAG, to compare with the sum of the phases."""
    workflows = lean / "workflows"
    runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in SPLIT_COLUMNS}
    detail: dict[str, list[dict[str, float]]] = {backend: [] for backend in BACKENDS}
    for _ in range(args.repeat):
        for name, (build, backend, state) in SPLIT_COLUMNS.items():
            if state == "empty":
                split = functools.partial(in_empty_cache, lean, functools.partial(
                    cost_split, workflows, backend=backend, build=build))
            else:
                split = functools.partial(cost_split, workflows, lean_cache(lean, backend) if state == "warm" else "",
                                          backend, build)
            runs[name].append(in_fork(split))
        for backend in BACKENDS:
            detail[backend].append(in_fork(lambda b=backend: operator_detail(workflows, lean_cache(lean, b), b)))

    def us(samples: list[dict[str, float]], key: str, per: str) -> float | None:
        values = [s[key] / s[per] * 1e6 for s in samples if key in s]
        return statistics.median(values) if values else None

    def cell(value: float | None, width: int = SPLIT_WIDTH) -> str:
        return f"{value:{width}.0f}" if value is not None else f"{'-':>{width}s}"

    def total(phases: dict[str, float]) -> float:
        return sum(v for k, v in phases.items() if k != "files")

    rest = {name: [r["rest"] for r in samples] for name, samples in runs.items()}
    n = statistics.median(s["files"] for s in rest["local cold"]) + 1
    once = {name: {key: statistics.median(r[key][key] for r in samples) / n
                   for key in ("once", "prune")} for name, samples in runs.items()}
    first = {name: statistics.median(total(r["first"]) for r in samples) for name, samples in runs.items()}
    sums = {name: statistics.median(total(s) / s["files"] * 1e6 for s in rest[name]) + (once[name]["prune"] * 1e6)
            for name in SPLIT_COLUMNS}
    print(f"\ncost split of our lean parse, us/DAG over files 2..N (CPU, median of {args.repeat} runs, each in a "
          "fresh fork; one timer per phase around the package's own functions). k8s = building stub, backend "
          "kubernetes; err = the error stub (find_workflow_errors), backend kubernetes; cold: no cache (the error "
          "stub builds whole); empty: cache enabled but empty, written (the error stub compiles and plans); warm: "
          "the disk cache of the lean runs (the error stub reads the verdict):")
    print(f"  {'phase':{SPLIT_LABEL}s}" + "".join(f"{name:>{SPLIT_WIDTH}s}" for name in SPLIT_COLUMNS))
    for key, label in SPLIT_PHASES:
        print(f"  {label:{SPLIT_LABEL}s}" + "".join(cell(us(rest[name], key, "files")) for name in SPLIT_COLUMNS))
    rows = (("prune (once per folder, building stub), /N", {name: once[name]["prune"] * 1e6 for name in runs}),
            ("sum of the phases, files 2..N (+ prune)", sums),
            ("first file (lazy imports, first use), /N", {name: first[name] / n * 1e6 for name in runs}),
            ("once: catalog, pools, context, files, /N", {name: once[name]["once"] * 1e6 for name in runs}),
            ("whole stub call (lean runs above)", {name: whole_ms[SPLIT_WHOLE[name]] * 1000 for name in runs}))
    for label, values in rows:
        print(f"  {label:{SPLIT_LABEL}s}" + "".join(cell(values[name]) for name in SPLIT_COLUMNS))
    print("  the first file alone, ms: " + ", ".join(f"{name} {value * 1000:.1f}" for name, value in first.items())
          + "; the largest of its phases: " + ", ".join(
              f"{name} {max(runs[name][0]['first'].items(), key=lambda kv: kv[1])[0]}" for name in SPLIT_COLUMNS))

    print("DAG and operator construction, us per DAG (dag rows) or per task (the others), files 2..N, CPU, "
          "median; the steps mirror factory/loader.py (plan_dag, build_dag) and operators/build.py:")
    print(f"  {'step':55s}" + "".join(f"{backend:>12s}" for backend in BACKENDS))
    for key, label in DETAIL_ROWS:
        per = "dags" if key.startswith("dag") else "tasks"
        print(f"  {label:55s}" + "".join(cell(us(detail[b], key, per), 12) for b in BACKENDS))


# ------------------------------------------------------------------------------------------ largest folder
def run_large(root: Path, n: int, backend: str = "kubernetes") -> None:
    """The building stub's cold (no cache), empty-cache (the first parse, writing the cache) and warm parse of
    one folder of ``n`` txt2img copies, once each, against ``dag_file_processor_timeout`` (wall time of the whole
    file parse); then the error stub's parse of the same folder in the same three cache states (its own file,
    so its own timeout)."""
    from airflow.configuration import conf

    timeout = conf.getfloat("dag_processor", "dag_file_processor_timeout", fallback=50.0)
    large = root / "large"
    workflows, cache_dir = large / "workflows", str(large / "cache")
    t0 = time.perf_counter()
    in_fork(lambda: write_copies(workflows, n))
    print(f"\nlargest folder: {n} copies of {LEAN_SOURCE.name} in one folder (written in "
          f"{time.perf_counter() - t0:.1f} s), backend {backend}, one run each, against "
          f"[dag_processor] dag_file_processor_timeout = {timeout:.0f} s (wall time of the whole file parse):")
    runs = {}
    for label, cache in (("cold (no cache)", ""), ("empty cache (first parse, writes it)", cache_dir),
                         ("warm (disk cache hit)", cache_dir)):
        last = label.startswith("warm")
        runs[label] = r = in_fork(lambda c=cache, last=last: measure_comfy(workflows, c, backend, last))
        assert r["dags"] == n, (label, r["dags"])
    serialized = runs["warm (disk cache hit)"]  # the same DAGs whichever way they were loaded: serialized once
    print(f"  then DagSerialization.to_dict of the {n} DAGs (the dag-processor's next step, same timeout; measured "
          f"once, after the warm load): {serialized['serialize_cpu_s']:.2f} s CPU / "
          f"{serialized['serialize_wall_s']:.2f} s wall")
    for label, r in runs.items():
        cpu = r["import_s"] + r["cpu_s"] + serialized["serialize_cpu_s"]
        wall = r["import_s"] + r["wall_s"] + serialized["serialize_wall_s"]  # the import is timed in CPU only
        print(f"  {label:38s} load {r['cpu_s']:5.2f} s CPU / {r['wall_s']:5.2f} s wall "
              f"({r['cpu_s'] / n * 1000:.2f} ms/DAG CPU); with import and serialization {cpu:5.1f} s CPU "
              f"({cpu / timeout:4.0%} of the timeout) / {wall:5.1f} s wall ({wall / timeout:4.0%})")
    print("  the error stub, a file of its own (its own timeout; it serializes nothing):")
    errors = (("error stub, cold (no cache: build_dag)", lambda: measure_errors(workflows, "", backend)),
              ("error stub, empty cache (compile+plan)",
               lambda: in_empty_cache(large, lambda c: measure_errors(workflows, c, backend))),
              ("error stub, warm (verdicts on disk)", lambda: measure_errors(workflows, cache_dir, backend)))
    for label, measure in errors:
        r = in_fork(measure)
        assert (r["good"], r["errors"]) == (n, []), (label, r["good"], r["errors"])
        cpu, wall = r["import_s"] + r["cpu_s"], r["import_s"] + r["wall_s"]
        print(f"  {label:38s} scan {r['cpu_s']:5.2f} s CPU / {r['wall_s']:5.2f} s wall "
              f"({r['cpu_s'] / n * 1000:.2f} ms/DAG CPU); with import {cpu:5.1f} s CPU ({cpu / timeout:4.0%} of the "
              f"timeout) / {wall:5.1f} s wall ({wall / timeout:4.0%})")


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None,
                        help="number of workflow files / DAGs (default: 100 for heavy, 200 for lean)")
    parser.add_argument("--scenario", choices=("all", "heavy", "lean"), default="all",
                        help="heavy: the templates vs dag-factory YAML made from our DAGs; lean: txt2img copies vs "
                             "short dag-factory YAML and a hand-written DAG file (default: both)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repetitions of each measurement (default 3: keeps `make bench` near 1 minute)")
    parser.add_argument("--no-split", dest="split", action="store_false",
                        help="leave out the lean scenario's per-phase cost split")
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfiles: of our heavy cold parse, and of our lean cold and warm parses")
    parser.add_argument("--profile-backend", choices=BACKENDS, default="kubernetes",
                        help="the backend of the lean scenario's profiles (default kubernetes)")
    parser.add_argument("--large", type=int, default=1000, metavar="N",
                        help="time one cold, cache-writing and warm parse of a folder of N txt2img copies (wall and "
                             "CPU) against dag_file_processor_timeout (default 1000, about 25 s CPU; 0: off)")
    parser.add_argument("--no-serialize", dest="serialize", action="store_false",
                        help="leave out the lean scenario's serialization line (DagSerialization.to_dict)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--verbose", action="store_true", help="print every run's timings")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="airflow-comfy-bench-"))
    # A private AIRFLOW_HOME: default [core]/[comfy] settings, nothing written to the user's home.
    os.environ["AIRFLOW_HOME"] = str(root / "airflow_home")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__DAG_FACTORY__ENABLE_TELEMETRY"] = "False"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["SCARF_NO_ANALYTICS"] = "true"
    try:
        return run(root, args)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    # Imported once, in the parent every measurement is forked from (like the dag-processor's manager).
    import airflow  # noqa: F401
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator  # noqa: F401

    print(f"setup: airflow + KubernetesPodOperator imported in {time.perf_counter() - t0:.1f} s "
          "(once, in the parent process; not counted)")
    # The dag-processor's manager freezes its heap before forking parsers (gc.freeze() in
    # DagFileProcessorManager.before_run): the children's garbage collections then skip Airflow's objects.
    gc.freeze()
    if args.scenario in ("all", "heavy"):
        run_heavy(root, args)
    if args.scenario in ("all", "lean"):
        run_lean(root, args)
    if args.large:
        run_large(root, args.large)
    return 0


def run_heavy(root: Path, args: argparse.Namespace) -> None:
    info = in_fork(lambda: prepare(root, args.n or 100))
    workflows, cache_dir = root / "workflows", str(root / "cache")
    print(f"setup: {info['templates']} templates become DAGs -> {info['dags']} workflow files, "
          f"{info['dags']} dag-factory YAML files (x2: our exact arguments / --spec as a file path)")

    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "comfy-cold": lambda: measure_comfy(workflows, ""),
        "comfy-warm": lambda: measure_comfy(workflows, cache_dir),
        "df-same-args": lambda: measure_dagfactory(root / "yaml"),
        "df-lean-args": lambda: measure_dagfactory(root / "yaml-lean"),
    }
    names = list(measures)
    results = repeat_measures(measures, args.repeat, args.verbose)

    # The shape check: both sides built the same DAGs, tasks and dependencies, all KPO tasks.
    for name in names:
        for r in results[name]:
            assert (r["dags"], r["tasks"]) == (info["dags"], info["tasks"]), (name, r["dags"], r["tasks"])
            assert r["kpo_tasks"] == r["tasks"], (name, r["kpo_tasks"], r["tasks"])
            assert r["shape"] == info["shape"], f"{name}: dag ids / task ids / dependencies differ"

    def ms(name: str, key: str = "cpu_s", per_dag: bool = True) -> float:
        value = statistics.median(r[key] for r in results[name]) * 1000
        return value / info["dags"] if per_dag else value

    cold, warm = ms("comfy-cold"), ms("comfy-warm")
    same, lean = ms("df-same-args"), ms("df-lean-args")
    print(f"check: both sides built {info['dags']} DAGs / {info['tasks']} KubernetesPodOperator tasks "
          f"({info['tasks'] / info['dags']:.1f} per DAG), same dag ids, task ids and dependencies")
    print(f"median CPU time of {args.repeat} runs, each in a fresh fork with airflow + KPO imported:")
    print(f"cold parse: airflow-comfy {cold:.2f} ms/DAG, dag-factory {same:.2f} ms/DAG, "
          f"ratio {cold / same:.2f}x (target <= {TARGET_RATIO}x)")
    print(f"cold parse vs lean dag-factory (--spec as a file path): {lean:.2f} ms/DAG, "
          f"ratio {cold / lean:.2f}x (target <= {TARGET_RATIO}x)")
    print(f"warm parse: airflow-comfy {warm:.2f} ms/DAG (disk cache hit), ratio {warm / same:.2f}x "
          f"(lean: {warm / lean:.2f}x)")
    print(f"library import, once per file parse: airflow-comfy {ms('comfy-cold', 'import_s', False):.0f} ms, "
          f"dag-factory {ms('df-same-args', 'import_s', False):.0f} ms")
    if args.profile:
        print(in_fork(lambda: profile_comfy(workflows, 25)))
    elif cold / lean > TARGET_RATIO:
        print("over target against lean dag-factory: run with --profile to see where our time goes")


if __name__ == "__main__":
    sys.exit(main())
