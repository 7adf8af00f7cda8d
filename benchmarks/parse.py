"""Parse-time benchmark: airflow-comfy's factory vs astronomer dag-factory building the same DAGs.

Run with ``make bench`` (``.venv/bin/python benchmarks/parse.py [--n N] [--repeat 3] [--scenario all|heavy|lean]
[--large 1000] [--verbose] [--profile] [--keep]``). See ``benchmarks/README.md`` for how to read the output.

Two scenarios and one figure (each measurement in a fresh fork, see "How it measures"):
    * heavy (below): the comfyui-workflow-templates against dag-factory YAML generated from our DAGs.
    * lean: N (default 200) copies of ``example_workflows/txt2img_api.json`` that differ in their prompt (2
      groups, so 2 tasks each), loaded with backend ``local`` and ``kubernetes``, cold and warm, against
      (a) dag-factory 1.1.0 on N YAML files of one DAG of 2 plain KubernetesPodOperators with short arguments
      and one dependency, and (b) a hand-written Python DAG file building the same N DAGs in a loop (the
      floor of operator construction). All build the same dag ids, task ids and dependencies. Targets: ours
      / dag-factory <= 0.8x cold, <= 0.4x warm. Then, unless ``--no-split``, a per-phase cost split of our
      parse (cost_split: the package's own functions called in the loader's order, a timer around each) and a
      DAG/operator construction breakdown with reference operators (operator_detail); unless
      ``--no-serialize``, the cost of the dag-processor's next step, ``DagSerialization.to_dict``; with
      ``--profile``, cProfiles of a cold and a warm parse (``--profile-backend``).
    * ``--large N`` (default 1000; 0: off): one cold, cache-writing and warm parse of a folder of N copies,
      wall and CPU, plus serialization, against ``dag_file_processor_timeout``.

What is compared (heavy)
    * airflow-comfy: ``load_workflows(folder, globals_dict, settings=...)`` on N ComfyUI workflow files (the
      templates of ``comfyui-workflow-templates`` that become DAGs, copied round-robin), backend
      ``kubernetes`` so every task is a ``ComfyGroupPodOperator`` (a KubernetesPodOperator).
    * dag-factory: its documented entry point ``dagfactory.load_yaml_dags(globals_dict, dags_folder=...)`` on
      N YAML files, one DAG per file, generated from the DAGs our factory built: same dag ids, task ids and
      dependencies, one plain ``KubernetesPodOperator`` per task with the same image, cmds, arguments, pod
      name, labels, annotations, env, pool, priority (weight, weight rule, priority class) and retries, and
      the same DAG params as typed ``airflow.sdk.Param`` objects (dag-factory's ``__type__`` syntax), so both
      sides pay Airflow's per-task params copy alike. Two variants:
        - "same args": the arguments are our tasks' very strings, including ``--spec`` with the base64 group
          spec (several KB per task). dag-factory then spends most of its time in PyYAML on those blobs.
        - "lean": ``--spec`` is a short file path instead, as a YAML author would write it; everything else
          is the same. This is the stricter comparison.
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
    * warm: the disk cache is populated during setup, the memory cache is empty (fresh fork): the
      dag-processor's steady state for unchanged files.
    Repetitions interleave the four measurements, rotating their order; medians are reported.

No timing is asserted: this is a report. The shape check is asserted: both sides must build the same dag
ids, task ids and dependencies, all tasks KubernetesPodOperators.
"""

from __future__ import annotations

import argparse
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
    dags = {value.dag_id: value for value in globals_dict.values()
            if isinstance(value, DAG) and value.dag_id != "airflow_comfy_workflow_errors"}
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
    if lean:  # what a YAML author would write: the spec as a file reference, not an inline base64 blob
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
        "env_vars": {e.name: e.value for e in task.env_vars},
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "termination_message_policy": task.termination_message_policy,
        "do_xcom_push": True,
        "image_pull_policy": task.image_pull_policy,
        "pool": task.pool,
        "priority_weight": task.priority_weight,
        "weight_rule": task.weight_rule,
        "priority_class_name": task.priority_class_name,
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


def measure_comfy(workflows: Path, cache_dir: str, backend: str = "kubernetes", serialize: bool = False,
                  ) -> dict[str, Any]:
    t0 = time.process_time()
    from airflow_comfy.factory import cache
    from airflow_comfy.factory.loader import load_workflows

    # build_group_task imports the backend's operator module on the first task: a once-per-file cost too
    importlib.import_module(OPERATOR_MODULES[backend])
    import_s = time.process_time() - t0
    settings = comfy_settings(cache_dir, backend)
    cache.clear_memory()
    return _timed(lambda g: load_workflows(workflows, g, settings=settings), import_s, serialize)


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
    built: dict[str, Any] = {}
    # This cold load also fills the disk cache that the "warm" measurements read (its key ignores the backend).
    load_workflows(lean / "workflows", built, settings=comfy_settings(str(lean / "cache")))
    cache.clear_memory()
    shape = dag_shape(built)
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
    workflows, cache_dir = lean / "workflows", str(lean / "cache")
    print(f"\nlean: {n} copies of {LEAN_SOURCE.name} (prompts differ) -> {info['dags']} DAGs of "
          f"{info['tasks'] // info['dags']} tasks. dag-factory YAML and a hand-written Python file build the "
          "same dag ids, task ids and dependencies with plain KubernetesPodOperators and short arguments.")
    measures: dict[str, Callable[..., dict[str, Any]]] = {}
    for backend in BACKENDS:
        measures[f"{backend} cold"] = lambda serialize=False, b=backend: measure_comfy(workflows, "", b, serialize)
        measures[f"{backend} warm"] = lambda serialize=False, b=backend: measure_comfy(workflows, cache_dir, b,
                                                                                       serialize)
    measures["dag-factory lean"] = lambda serialize=False: measure_dagfactory(lean / "yaml", serialize)
    measures["hand-written"] = lambda serialize=False: measure_hand_written(lean / "hand" / HAND_WRITTEN_FILE,
                                                                             serialize)
    results = repeat_measures(measures, args.repeat, args.verbose)
    for name, runs in results.items():
        for r in runs:
            assert r["shape"] == info["shape"], f"{name}: dag ids / task ids / dependencies differ"
            expected_kpo = 0 if name.startswith("local") else info["tasks"]
            assert r["kpo_tasks"] == expected_kpo, (name, r["kpo_tasks"], expected_kpo)

    ms = {name: statistics.median(r["cpu_s"] for r in runs) * 1000 / info["dags"]
          for name, runs in results.items()}
    df, hand = ms["dag-factory lean"], ms["hand-written"]
    print(f"lean parse, ms/DAG (median CPU time of {args.repeat} runs, each in a fresh fork; imports not counted):")
    for backend in BACKENDS:
        print(f"  {'airflow-comfy, backend ' + backend:35s}cold {ms[f'{backend} cold']:5.2f}   "
              f"warm {ms[f'{backend} warm']:5.2f}")
    print(f"  {'dag-factory 1.1.0, lean YAML':35s}     {df:5.2f}   (2 plain KPO, short args, a >> b)")
    print(f"  {'hand-written Python DAG file':35s}     {hand:5.2f}   (the floor: DAG + 2 KPO + a >> b)")
    targets = ", ".join(f"{kind} <= {target}x" for kind, target in LEAN_TARGETS.items())
    print(f"lean ratios: ours / dag-factory lean (target {targets}); ours / hand-written:")
    for backend in BACKENDS:
        cells = []
        for kind, target in LEAN_TARGETS.items():
            ratio = ms[f"{backend} {kind}"] / df
            cells.append(f"{kind} {ratio:.2f}x{'' if ratio <= target else ' (over)'}")
        hand_cells = ", ".join(f"{kind} {ms[f'{backend} {kind}'] / hand:.2f}x" for kind in LEAN_TARGETS)
        print(f"  {backend:10s}  vs dag-factory: {', '.join(cells):37s} vs hand-written: {hand_cells}")
    imports = {name: statistics.median(r["import_s"] for r in runs) * 1000 for name, runs in results.items()}
    print(f"library import, once per file parse: airflow-comfy local {imports['local cold']:.0f} ms, "
          f"kubernetes {imports['kubernetes cold']:.0f} ms, dag-factory {imports['dag-factory lean']:.0f} ms")
    if args.serialize:
        serialized = {name: in_fork(lambda name=name: measures[name](serialize=True))
                      for name in ("local warm", "kubernetes warm", "dag-factory lean", "hand-written")}
        print("then the dag-processor serializes every DAG (DagSerialization.to_dict, inside the same "
              "dag_file_processor_timeout; CPU ms/DAG, one run each, not in the ratios above):\n  "
              + ", ".join(f"{name.replace(' warm', '')} {r['serialize_cpu_s'] * 1000 / r['dags']:.2f}"
                          for name, r in serialized.items()))
    if args.split:
        run_split(lean, args, ms)
    if args.profile:
        for kind, cache in (("cold", ""), ("warm", cache_dir)):
            print(f"\ncProfile of one lean {kind} parse, backend {args.profile_backend}:")
            print(in_fork(lambda c=cache: profile_lean(workflows, c, args.profile_backend, 25)))


# ------------------------------------------------------------------------------------------ cost split
#: (key, label) of the phases cost_split() times, in the order of the table.
SPLIT_PHASES = (
    ("read", "read (stat, bytes, sidecar, dag id)"),
    ("cache key", "cache key (sha256)"),
    ("parse", "parse/convert (parse_workflow_text)"),
    ("validate", "validate"),
    ("slice", "slice (slice_workflow)"),
    ("params", "params (discover_params)"),
    ("spec", "spec (specs, to_dict, to_data_uri)"),
    ("docs", "docs (workflow_doc_md)"),
    ("cache put", "cache put (memory only: cold)"),
    ("cache read", "cache read (file)"),
    ("decode", "JSON decode + from_dict"),
    ("DAG", "DAG construction (build_dag, no tasks)"),
    ("task inputs", "GroupSpec.from_dict + task_config_for"),
    ("operators", "operator construction (build_group_task)"),
    ("dependencies", "dependencies (a >> b)"),
)


def cost_split(workflows: Path, cache_dir: str, backend: str) -> dict[str, dict[str, float]]:
    """(In a fork.) ``load_workflows``' work, file by file, with a CPU timer around each phase. Returns
    ``{"rest": {phase: seconds summed over files 2..N, "files": N - 1}, "first": {phase: seconds of the first
    file}, "once": {"once": catalog and file list}}``. The first file is apart because it pays the lazy imports
    and first-use initialisation (Airflow imports its timetables on the first DAG, for one).

    It calls the package's own functions in the order ``factory/loader.py`` (``_load_one``, ``build_dag``)
    and ``factory/compile.py`` (``compile_workflow``) do, without patching them: when those change shape,
    this function is the one to adapt. Error handling is left out (every benchmark file is good)."""
    import dataclasses
    import hashlib

    from airflow_comfy.factory import cache as cache_module
    from airflow_comfy.factory.compile import CompiledWorkflow, cache_key, dag_id_for
    from airflow_comfy.factory.docs import workflow_doc_md
    from airflow_comfy.factory.loader import _workflow_files, build_dag, task_config_for
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
    from airflow_comfy.operators.build import build_group_task
    from airflow_comfy.workflow.catalog import load_catalog
    from airflow_comfy.workflow.groupspec import GroupSpec
    from airflow_comfy.workflow.loader import parse_workflow_text
    from airflow_comfy.workflow.params import bindings, discover_params
    from airflow_comfy.workflow.slicing import slice_workflow
    from airflow_comfy.workflow.validate import validate

    importlib.import_module(OPERATOR_MODULES[backend])  # a once-per-file import, not a phase
    settings = comfy_settings(cache_dir, backend)
    cache_module.clear_memory()
    clock = time.process_time
    spent: dict[str, dict[str, float]] = {"once": {}, "first": {}, "rest": {}}
    bucket = spent["once"]
    last = clock()

    def lap(phase: str) -> None:
        nonlocal last
        now = clock()
        bucket[phase] = bucket.get(phase, 0.0) + now - last
        last = now

    catalog = load_catalog(settings.object_info_files)
    catalog.fingerprint()  # memoized: the first cache_key() would pay it
    store = cache_module.CompileCache(settings.cache_dir or None)
    files = _workflow_files(workflows, [])
    lap("once")
    for index, path in enumerate(files):
        bucket = spent["first" if index == 0 else "rest"]
        sidecar = load_sidecar(sidecar_path(path))
        dag_id_for(path, sidecar)
        path.stat()
        content = path.read_bytes()
        lap("read")
        key = cache_key(content, sidecar, catalog, str(path))
        lap("cache key")
        cached = None
        if store.directory is not None:  # CompileCache.get, in two steps
            text = (store.directory / f"{key}.json").read_text(encoding="utf-8")
            lap("cache read")
            cached = json.loads(text)
        if cached is not None:
            compiled = CompiledWorkflow.from_dict(cached)
            lap("decode")
        else:  # compile_workflow, phase by phase
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
                       "spec_uri": s.to_data_uri()} for s, g in zip(specs, graph.groups, strict=True)]
            lap("spec")
            doc_md = workflow_doc_md(graph, params, sidecar)
            lap("docs")
            compiled = CompiledWorkflow(
                dag_id=dag_id_for(path, sidecar), name=name, source=source, sha256=sha, mode=graph.mode,
                groups=groups, doc_md=doc_md,
                params=[{"name": p.name, "title": p.title, "description": p.description, "schema": p.schema,
                         "default": p.default} for p in params])
            store.put(key, compiled.to_dict())
            lap("cache put")
        dag = build_dag(dataclasses.replace(compiled, groups=[]), sidecar, settings)
        lap("DAG")
        tasks = {}
        for group in compiled.groups:  # build_dag's task loop
            spec = GroupSpec.from_dict(group["spec"])
            task_config = task_config_for(sidecar, group["task_id"], settings)
            lap("task inputs")
            tasks[group["task_id"]] = build_group_task(spec, task_config=task_config, settings=settings,
                                                       upstream_task_ids=group["upstream"], dag=dag,
                                                       spec_uri=group["spec_uri"])
            lap("operators")
        for group in compiled.groups:
            for upstream in group["upstream"]:
                tasks[upstream] >> tasks[group["task_id"]]
        lap("dependencies")
    spent["rest"]["files"] = len(files) - 1
    return spent


#: (key, label) of operator_detail()'s rows. "ref" rows build other objects on the same workflows, for comparison.
DETAIL_ROWS = (
    ("dag", "build_dag without tasks (our DAG: params, doc_md)"),
    ("dag no params", "ref: the same DAG without its params"),
    ("dag bare", "ref: DAG(dag_id, schedule=None)"),
    ("task_kwargs", "task_kwargs (BaseOperator kwargs, with doc_md)"),
    ("doc_md", "  of which spec_doc_md (timed again, alone)"),
    ("arguments", "runner_arguments"),
    ("pod_kwargs", "group_pod_kwargs (kubernetes only)"),
    ("init", "our operator's __init__, on our DAG"),
    ("init bare", "our operator's __init__, on a bare DAG"),
    ("ref kpo", "ref: plain KPO, lean args, on our DAG"),
    ("ref kpo bare", "ref: plain KPO, lean args, on a bare DAG"),
    ("ref base", "ref: BaseOperator(task_id), on our DAG"),
    ("ref base bare", "ref: BaseOperator(task_id), on a bare DAG"),
)


def operator_detail(workflows: Path, cache_dir: str, backend: str) -> dict[str, float]:
    """(In a fork.) What one DAG and one task of ``build_dag`` / ``build_group_task`` cost, step by step
    (mirroring ``operators/build.py``'s ``_pod_task`` / ``_local_task``), and what simpler DAGs and operators
    cost on the same workflows. "Our DAG" is ``build_dag`` of the workflow without its tasks (it has the
    workflow's params, whose copies every task pays); a bare DAG has none. The compiled workflows come from
    the disk cache (untimed). Returns seconds: ``dag*`` rows summed over the DAGs (``dags``), the other rows
    over the tasks (``tasks``), of files 2..N (the first pays lazy imports, see cost_split)."""
    import dataclasses
    import functools

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import DAG, BaseOperator

    from airflow_comfy.factory.cache import CompileCache
    from airflow_comfy.factory.compile import CompiledWorkflow, cache_key
    from airflow_comfy.factory.loader import _workflow_files, build_dag, task_config_for
    from airflow_comfy.factory.sidecar import load_sidecar, sidecar_path
    from airflow_comfy.operators.build import spec_doc_md, task_kwargs
    from airflow_comfy.operators.command import runner_arguments
    from airflow_comfy.operators.local import ComfyGroupLocalOperator
    from airflow_comfy.operators.pod import ComfyGroupPodOperator, group_pod_kwargs, pod_models_path
    from airflow_comfy.workflow.catalog import load_catalog
    from airflow_comfy.workflow.groupspec import GroupSpec

    settings = comfy_settings(cache_dir, backend)
    catalog, store = load_catalog(settings.object_info_files), CompileCache(cache_dir)
    clock = time.process_time
    spent: dict[str, float] = {}
    for index, path in enumerate(_workflow_files(workflows, [])):
        if index <= 1:  # start (again) after the first file
            spent = {key: 0.0 for key, _ in DETAIL_ROWS} | {"dags": 0, "tasks": 0}
        sidecar = load_sidecar(sidecar_path(path))
        compiled = CompiledWorkflow.from_dict(store.get(cache_key(path.read_bytes(), sidecar, catalog, str(path))))

        def ours(suffix: str, compiled: Any = compiled, sidecar: Any = sidecar, **changes: Any) -> Any:
            return build_dag(dataclasses.replace(compiled, dag_id=compiled.dag_id + suffix, groups=[], **changes),
                             sidecar, settings)

        t0 = clock()
        dag = ours("")
        t1 = clock()
        ours("_no_params", params=[])
        t2 = clock()
        DAG(dag_id=compiled.dag_id + "_bare", schedule=None)
        t3 = clock()
        spent["dag"] += t1 - t0
        spent["dag no params"] += t2 - t1
        spent["dag bare"] += t3 - t2
        spent["dags"] += 1
        # untimed: the DAGs the other operators go to (one per kind: task ids repeat)
        ref_dags = {kind: ours(f"_{kind}") for kind in ("kpo", "base")}
        bare_dags = {kind: DAG(dag_id=f"{compiled.dag_id}_{kind}_bare", schedule=None)
                     for kind in ("ours", "kpo", "base")}
        for group in compiled.groups:
            spec = GroupSpec.from_dict(group["spec"])
            task_config = task_config_for(sidecar, group["task_id"], settings)
            args = lean_arguments(compiled.dag_id, spec.group)
            t0 = clock()
            common = task_kwargs(spec, task_config=task_config, settings=settings, task_id=None, dag=dag)
            t1 = clock()
            spec_doc_md(spec)
            t2 = clock()
            if backend == "kubernetes":
                arguments = runner_arguments(spec, store=settings.artifact_store, models_path=pod_models_path(settings),
                                             input_path=settings.pod_input_path, upstream_task_ids=group["upstream"],
                                             spec_uri=group["spec_uri"])
                t3 = clock()
                pod_kwargs = group_pod_kwargs(spec, task_config=task_config, settings=settings,
                                              dag_id=compiled.dag_id)
                t4 = clock()
                make = functools.partial(ComfyGroupPodOperator, arguments=arguments, **pod_kwargs, **common)
            else:
                arguments = runner_arguments(spec, store=settings.artifact_store, models_path=settings.models_path,
                                             input_path=settings.input_path, upstream_task_ids=group["upstream"],
                                             spec_uri=group["spec_uri"])
                t3 = t4 = clock()
                make = functools.partial(ComfyGroupLocalOperator, arguments=arguments, env=dict(task_config.env),
                                         runner_python=settings.runner_python or None,
                                         aws_conn_id=settings.aws_conn_id or None, **common)
            t5 = clock()
            make(dag=dag)
            t6 = clock()
            make(dag=bare_dags["ours"])
            t7 = clock()
            KubernetesPodOperator(task_id=spec.group, image=LEAN_IMAGE, cmds=LEAN_CMDS, arguments=args,
                                  dag=ref_dags["kpo"])
            t8 = clock()
            KubernetesPodOperator(task_id=spec.group, image=LEAN_IMAGE, cmds=LEAN_CMDS, arguments=args,
                                  dag=bare_dags["kpo"])
            t9 = clock()
            BaseOperator(task_id=spec.group, dag=ref_dags["base"])
            t10 = clock()
            BaseOperator(task_id=spec.group, dag=bare_dags["base"])
            t11 = clock()
            for key, seconds in (("task_kwargs", t1 - t0), ("doc_md", t2 - t1), ("arguments", t3 - t2),
                                 ("pod_kwargs", t4 - t3), ("init", t6 - t5), ("init bare", t7 - t6),
                                 ("ref kpo", t8 - t7), ("ref kpo bare", t9 - t8), ("ref base", t10 - t9),
                                 ("ref base bare", t11 - t10)):
                spent[key] += seconds
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
    from airflow_comfy.operators import build
    from airflow_comfy.workflow.groupspec import GroupSpec

    ours = importlib.import_module(OPERATOR_MODULES[backend])
    our_class = ours.ComfyGroupPodOperator if backend == "kubernetes" else ours.ComfyGroupLocalOperator
    return [
        ("load_workflows", loader.load_workflows),
        ("  compile_workflow (cold only)", compile_module.compile_workflow),
        ("  CompileCache.get (warm: read + JSON decode)", loader.CompileCache.get),
        ("  build_dag", loader.build_dag),
        ("    DAG.__init__ (attrs)", DAG.__init__),
        ("    Param.__init__ (DAG params)", Param.__init__),
        ("    build_group_task", build.build_group_task),
        ("      spec_doc_md", build.spec_doc_md),
        ("      GroupSpec.from_dict", GroupSpec.from_dict),
        ("      apply_defaults wrapper (outermost call)", KubernetesPodOperator.__init__),
        (f"        {our_class.__name__}.__init__ (with super())", our_class.__init__.__wrapped__),
        ("        KubernetesPodOperator.__init__ (with super())", KubernetesPodOperator.__init__.__wrapped__),
        ("        BaseOperator.__init__", BaseOperator.__init__.__wrapped__),
        ("        get_merged_defaults (each level)", base_operator.get_merged_defaults),
        ("          ParamsDict.__deepcopy__ (DAG params)", ParamsDict.__deepcopy__),
        ("        BaseOperator.__setattr__", BaseOperator.__setattr__),
        ("        _set_xcomargs_dependencies", BaseOperator._set_xcomargs_dependencies),
        ("        V1EnvVar.__init__", k8s.V1EnvVar.__init__),
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
    out.write(f"  {'function':58s}{'ms/DAG':>8s}{'calls/DAG':>11s}{'share':>8s}\n")
    for label, function in _focus_functions(backend):
        code = getattr(inspect.unwrap(function) if function is not None and "wrapper" not in label else function,
                       "__code__", None)
        row = raw.get((code.co_filename, code.co_firstlineno, code.co_name)) if code else None
        if row is None:
            out.write(f"  {label:58s}{'-':>8s}\n")
            continue
        _, calls, _, cumulative, _ = row
        out.write(f"  {label:58s}{cumulative / dags * 1000:8.3f}{calls / dags:11.2f}{cumulative / total:8.0%}\n")
    text = out.getvalue()
    for prefix in (str(Path(sys.prefix) / "lib"), str(Path(sys.base_prefix) / "lib"), str(Path.cwd()) + "/"):
        text = text.replace(prefix, "")
    return text


def run_split(lean: Path, args: argparse.Namespace, whole_ms: dict[str, float]) -> None:
    """Print cost_split()'s table (us/DAG) for both backends, cold and warm, and operator_detail()'s (us/task).
    ``whole_ms``: the lean measurements' ms/DAG, to compare with the sum of the phases."""
    workflows, cache_dir = lean / "workflows", str(lean / "cache")
    columns = {f"{backend} {kind}": (backend, "" if kind == "cold" else cache_dir)
               for backend in BACKENDS for kind in ("cold", "warm")}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
    detail: dict[str, list[dict[str, float]]] = {backend: [] for backend in BACKENDS}
    for _ in range(args.repeat):
        for name, (backend, cache) in columns.items():
            runs[name].append(in_fork(lambda b=backend, c=cache: cost_split(workflows, c, b)))
        for backend in BACKENDS:
            detail[backend].append(in_fork(lambda b=backend: operator_detail(workflows, cache_dir, b)))

    def us(samples: list[dict[str, float]], key: str, per: str) -> float | None:
        values = [s[key] / s[per] * 1e6 for s in samples if key in s]
        return statistics.median(values) if values else None

    def cell(value: float | None) -> str:
        return f"{value:10.0f}" if value is not None else f"{'-':>10s}"

    rest = {name: [r["rest"] for r in samples] for name, samples in runs.items()}
    print(f"\ncost split of our lean parse, us/DAG over files 2..N (CPU, median of {args.repeat} runs, each in a "
          "fresh fork; one timer per phase around the package's own functions):")
    print(f"  {'phase':42s}" + "".join(f"{name:>17s}" for name in columns))
    for key, label in SPLIT_PHASES:
        print(f"  {label:42s}" + "".join(f"{cell(us(rest[name], key, 'files')):>17s}" for name in columns))

    def total(phases: dict[str, float]) -> float:
        return sum(v for k, v in phases.items() if k != "files")

    sums = {name: statistics.median(total(s) / s["files"] * 1e6 for s in rest[name]) for name in columns}
    first = {name: statistics.median(total(r["first"]) for r in samples) for name, samples in runs.items()}
    once = {name: statistics.median(total(r["once"]) for r in samples) for name, samples in runs.items()}
    n = statistics.median(s["files"] for s in rest["local cold"]) + 1
    print(f"  {'sum of the phases, files 2..N':42s}" + "".join(f"{sums[name]:17.0f}" for name in columns))
    print(f"  {'first file (lazy imports, first use), /N':42s}"
          + "".join(f"{first[name] / n * 1e6:17.0f}" for name in columns))
    print(f"  {'once: catalog, file list, /N':42s}" + "".join(f"{once[name] / n * 1e6:17.0f}" for name in columns))
    print(f"  {'whole load_workflows call (lean runs above)':42s}"
          + "".join(f"{whole_ms[name] * 1000:17.0f}" for name in columns))
    print("  the first file alone, ms: " + ", ".join(f"{name} {value * 1000:.1f}" for name, value in first.items())
          + "; the largest of its phases: " + ", ".join(
              f"{name} {max(runs[name][0]['first'].items(), key=lambda kv: kv[1])[0]}" for name in columns))

    print("DAG and operator construction, us per DAG (dag rows) or per task (the others), files 2..N, CPU, "
          "median; the steps mirror factory/loader.py and operators/build.py:")
    print(f"  {'step':52s}" + "".join(f"{backend:>12s}" for backend in BACKENDS))
    for key, label in DETAIL_ROWS:
        per = "dags" if key.startswith("dag") else "tasks"
        print(f"  {label:52s}" + "".join(f"{cell(us(detail[b], key, per)):>12s}" for b in BACKENDS))


# ------------------------------------------------------------------------------------------ largest folder
def run_large(root: Path, n: int, backend: str = "kubernetes") -> None:
    """Cold, cache-writing and warm parse of one folder of ``n`` txt2img copies, once each, against
    ``dag_file_processor_timeout`` (wall time of the whole file parse)."""
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
    for label, cache in (("cold (no disk cache)", ""), ("first parse, writing the disk cache", cache_dir),
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
        print(f"  {label:36s} load {r['cpu_s']:5.2f} s CPU / {r['wall_s']:5.2f} s wall "
              f"({r['cpu_s'] / n * 1000:.2f} ms/DAG CPU); with import and serialization {cpu:5.1f} s CPU "
              f"({cpu / timeout:4.0%} of the timeout) / {wall:5.1f} s wall ({wall / timeout:4.0%})")


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
          f"{info['dags']} dag-factory YAML files (x2: inline spec / spec file reference)")

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
