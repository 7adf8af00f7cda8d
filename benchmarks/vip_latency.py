"""Scheduling benchmark: how long a VIP run waits for a saturated GPU pool, with VIP preemption off and on.

Run with ``python benchmarks/vip_latency.py [--runs 20] [--sampling-seconds 60] [--slots 2]
[--preempt-after 2] [--workflow txt2img] [--scenarios off,on] [--keep] [--verbose]`` (``make
bench-scheduling`` runs the full configuration). See ``benchmarks/README.md`` for how to read the output.

What runs
    A real deployment per scenario (tests/airflow_deployment.py): Airflow's scheduler with LocalExecutor,
    dag-processor and api-server, on a PostgreSQL server of the benchmark's own (tests/postgres.py; its binaries
    are installed from the distribution's ``postgresql`` package in setup when they are missing and we are
    root). One PostgreSQL server; each scenario gets a fresh clone of one migrated database, a fresh
    ``AIRFLOW_HOME`` and fresh services. The dags folder holds the two loader stubs and one example workflow
    (``txt2img`` by default: its first group, ``inference``, samples; ``postprocess`` decodes and saves).
    The sampling group goes to the pools file's ``role: sampling`` pool of ``--slots`` slots; every other group
    goes to ``default_pool``. Backend ``local``: each group is a runner subprocess on the tiny demo models,
    one CPU thread each (``COMFY_RUNNER_THREADS=1``).

The scenario
    ``--runs`` ``normal`` runs are triggered through the REST API (as the CLI does: no logical date, conf
    ``{"tier": "normal", "steps": N}``), back to back. Once the pool's slots are all taken by running sampling
    tasks (and ``--vip-delay`` seconds more), one ``vip`` run of the same params is triggered. The benchmark
    then waits until every run has finished and reads the timeline from the metadata database (``dag_run``,
    ``task_instance``, ``task_instance_history``, ``task_instance_note``). Scenario ``off`` sets
    ``[comfy] preemption = False``; scenario ``on`` sets it to True with ``preempt_after = --preempt-after``.

Setup (not timed)
    Demo models and inputs; calibration: the workflow run in-process twice with few steps (``--threads 1``) to
    measure the sampler's seconds per step, from which ``steps`` is chosen so that the sampler node alone takes
    ``--sampling-seconds`` (``--steps`` skips this); then the reference: one uninterrupted in-process run at
    those steps, whose image every run's image is compared with, pixel by pixel.

The DAG keeps Airflow's ``max_active_runs`` (``[core] max_active_runs_per_dag``, 16) unless
``--max-active-runs`` sets one through the workflow's sidecar: with more runs than that, the VIP run arrives as a
*queued dag run* that Airflow would start only when an active run ends, whatever its tier. With preemption on,
the watcher starts it at once (the run's note says so); with preemption off it waits.

``--logical-dates`` triggers with the trigger time as logical date instead. Airflow breaks ties between equal
weights by the run's logical date; without one (the CLI's and the REST API's default), the order of equal-weight
task instances is whatever PostgreSQL returns. A preempted task does not depend on it: the watcher raises its
weight by one within its tier, so it samples again before the runs of its tier that never started (the report
says how many overtook it).

No timing is asserted: this is a report. It exits 0 unless a run fails or times out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the deployment helpers (plain Python, no pytest)

DAG_ID = "vip_latency"
POOL = "bench_gpu"
TARGET_SECONDS = 5.0
CALIBRATION_STEPS = (25, 225)
MAX_STEPS = 10_000  # the KSampler's steps param schema


# --- setup ---------------------------------------------------------------------------------------------------------


def ensure_postgres() -> None:
    """The PostgreSQL server binaries: found, or installed from the distribution's package (as root, apt)."""
    from postgres import APT_INSTALL, PostgresUnavailable, find_postgres_bin

    try:
        find_postgres_bin()
        return
    except PostgresUnavailable:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise
    print(f"setup: installing the PostgreSQL server from the distribution's packages: {APT_INSTALL}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=subprocess.DEVNULL)
    find_postgres_bin()


def workflow_tasks(compiled: Any) -> tuple[str, str]:
    """(the first group that samples, the last group that saves images): their task ids."""
    from airflow_comfy.scheduling.pools import SAMPLING_NODE_TYPES

    sampling = [g["task_id"] for g in compiled.groups
                if any(n.get("class_type") in SAMPLING_NODE_TYPES for n in g["spec"]["nodes"].values())]
    images = [g["task_id"] for g in compiled.groups if g["spec"].get("output_nodes")]
    if not sampling or not images:
        raise SystemExit(f"{compiled.source}: needs a sampling group and an image-saving group "
                         f"(groups: {[g['task_id'] for g in compiled.groups]})")
    return sampling[0], images[-1]


def run_in_process(compiled: Any, paths: dict[str, Path], steps: int, run_id: str) -> tuple[float, Any]:
    """One uninterrupted run, in this process, one thread: (sampler node seconds, the result)."""
    from airflow_comfy.local_run import run_workflow
    from airflow_comfy.scheduling.pools import SAMPLING_NODE_TYPES

    # the runner's log and prints go to a file: its basicConfig is a no-op once the root logger has a handler
    with open(paths["scratch"] / "in-process-runs.log", "a") as log:
        logging.basicConfig(level=logging.INFO, stream=log, force=True)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                result = run_workflow(compiled, models=paths["models"], input_dir=paths["inputs"],
                                      store=paths["store"].as_uri(), params={"steps": steps}, run_id=run_id,
                                      extra_args=["--threads", "1"], in_process=True, echo=lambda _line: None)
        finally:
            for handler in logging.getLogger().handlers[:]:
                logging.getLogger().removeHandler(handler)
    seconds = 0.0
    for group in compiled.groups:
        samplers = [nid for nid, node in group["spec"]["nodes"].items()
                    if node.get("class_type") in SAMPLING_NODE_TYPES]
        timings = result.manifests[group["spec"]["group"]].get("timings", {}).get("nodes", {})
        seconds += sum(float(timings.get(nid, 0.0)) for nid in samplers)
    return seconds, result


def calibrate(compiled: Any, paths: dict[str, Path], target: float) -> tuple[int, float, float]:
    """Steps for the sampler to take ``target`` seconds on one thread: (steps, seconds per step, fixed s)."""
    low, high = CALIBRATION_STEPS
    t_low, _ = run_in_process(compiled, paths, low, "calibrate-low")
    t_high, _ = run_in_process(compiled, paths, high, "calibrate-high")
    per_step = max(1e-4, (t_high - t_low) / (high - low))
    fixed = max(0.0, t_low - low * per_step)
    return min(MAX_STEPS, max(1, math.ceil((target - fixed) / per_step))), per_step, fixed


def image_pixels(paths: list[Path]) -> list[Any]:
    import numpy as np
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return arrays


# --- one scenario ----------------------------------------------------------------------------------------------------


def scenario_env(home: Path, paths: dict[str, Path], preemption: bool, args: argparse.Namespace) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": pythonpath,
        "AIRFLOW__COMFY__POOLS_FILE": str(home / "pools.yaml"),
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__MODELS_PATH": str(paths["models"]),
        "AIRFLOW__COMFY__INPUT_PATH": str(paths["inputs"]),
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
        "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
        "AIRFLOW__COMFY__PREEMPTION": str(preemption),
        "AIRFLOW__COMFY__PREEMPT_AFTER": str(args.preempt_after),
        "COMFY_RUNNER_THREADS": "1",
    }


def prepare_home(home: Path, workflow: Path, args: argparse.Namespace) -> Path:
    dags = home / "dags"
    dags.mkdir(parents=True)
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(ROOT / "dags" / stub, dags)
    shutil.copy(workflow, dags / f"{DAG_ID}.json")
    (dags / f"{DAG_ID}.comfy.yaml").write_text(
        "# written by benchmarks/vip_latency.py\n"
        + (f"max_active_runs: {args.max_active_runs}\n" if args.max_active_runs else "")
        + "retries: 0\n")
    (home / "pools.yaml").write_text(f"pools:\n  {POOL}: {{slots: {args.slots}, gpus: 0, role: sampling}}\n")
    return dags


def trigger(deployment: Any, run_id: str, tier: str, steps: int, logical_date: bool) -> datetime:
    """A run through the REST API; with ``logical_date``, the trigger time is its logical date, else it has none
    (as ``airflow dags trigger`` without ``-l``)."""
    at = datetime.now(timezone.utc)
    status, body = deployment.rest("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                                   {"dag_run_id": run_id, "logical_date": at.isoformat() if logical_date else None,
                                    "conf": {"tier": tier, "steps": steps}})
    if status != 200:
        raise RuntimeError(f"triggering {run_id} ({tier}) answered {status}: {body}")
    return at


def running_in_pool(deployment: Any) -> int:
    return deployment.sql(f"SELECT count(*) FROM task_instance WHERE dag_id = '{DAG_ID}' AND pool = '{POOL}' "
                          "AND state = 'running'")[0][0]


def run_states(deployment: Any) -> dict[str, str]:
    return dict(deployment.sql(f"SELECT run_id, state FROM dag_run WHERE dag_id = '{DAG_ID}'"))


def run_scenario(name: str, preemption: bool, server: Any, paths: dict[str, Path], steps: int,
                 tasks: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    from airflow_deployment import AIRFLOW_BIN, AirflowDeployment
    from postgres import migrated_airflow_database

    home = paths["scratch"] / f"airflow-{name}"
    dags = prepare_home(home, paths["workflow"], args)
    started = time.monotonic()
    database = migrated_airflow_database(server, f"bench_{name}", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=AIRFLOW_BIN)
    deployment = AirflowDeployment(home, database, dags, env=scenario_env(home, paths, preemption, args),
                                   parallelism=args.parallelism)
    deployment.airflow("pools", "set", POOL, str(args.slots), "airflow-comfy VIP latency benchmark")
    width = len(str(args.runs))
    normal_ids = [f"normal-{i:0{width}d}" for i in range(1, args.runs + 1)]
    triggers: dict[str, datetime] = {}
    print(f"[{name}] starting the deployment (scheduler, dag-processor, api-server; preemption "
          f"{'on, preempt_after ' + str(args.preempt_after) + ' s' if preemption else 'off'})", flush=True)
    with deployment:
        deployment.wait_for_api()
        deployment.wait_for_dags({DAG_ID}, timeout=300)
        print(f"[{name}] up in {time.monotonic() - started:.0f} s; triggering {args.runs} normal runs", flush=True)
        for run_id in normal_ids:
            triggers[run_id] = trigger(deployment, run_id, "normal", steps, args.logical_dates)
        deployment.wait_for(f"{args.slots} running sampling tasks",
                            lambda: running_in_pool(deployment) >= args.slots, timeout=600, interval=0.5)
        time.sleep(args.vip_delay)
        triggers["vip"] = trigger(deployment, "vip", "vip", steps, args.logical_dates)
        print(f"[{name}] pool saturated; vip run triggered "
              f"{(triggers['vip'] - triggers[normal_ids[0]]).total_seconds():.1f} s after the first trigger",
              flush=True)
        budget = 600 + 3 * (args.runs + 1) * (args.sampling_seconds + 20) / args.slots
        last_report = time.monotonic()

        def all_done() -> bool:
            nonlocal last_report
            states = run_states(deployment)
            finished = [s for s in states.values() if s in ("success", "failed")]
            if time.monotonic() - last_report >= args.progress:
                last_report = time.monotonic()
                elapsed = (datetime.now(timezone.utc) - triggers[normal_ids[0]]).total_seconds()
                print(f"[{name}]   t+{elapsed:4.0f} s: {len(finished)}/{len(triggers)} runs finished, "
                      f"{running_in_pool(deployment)} sampling running, vip {states.get('vip', '-')}", flush=True)
            return len(finished) == len(triggers)

        deployment.wait_for("every run to finish", all_done, timeout=budget, interval=2.0)
        timeline = read_timeline(deployment, tasks, triggers)
    timeline["scenario_seconds"] = time.monotonic() - started
    timeline["home"] = home
    return timeline


def read_timeline(deployment: Any, tasks: tuple[str, str], triggers: dict[str, datetime]) -> dict[str, Any]:
    """Each run's trigger, end and its two tasks (final try, the first try's start, note) from the database."""
    sampling, image = tasks
    runs: dict[str, dict[str, Any]] = {
        run_id: {"trigger": at, "tier": "vip" if run_id == "vip" else "normal", "tasks": {}}
        for run_id, at in triggers.items()}
    for run_id, state, start, end, note in deployment.sql(
            "SELECT r.run_id, r.state, r.start_date, r.end_date, n.content FROM dag_run r "
            f"LEFT JOIN dag_run_note n ON n.dag_run_id = r.id WHERE r.dag_id = '{DAG_ID}'"):
        runs[run_id].update(state=state, start=start, end=end, note=note or "")
    for (run_id, task_id, state, tries, start, end, scheduled, queued, pool, weight, note) in deployment.sql(
            "SELECT ti.run_id, ti.task_id, ti.state, ti.try_number, ti.start_date, ti.end_date, ti.scheduled_dttm, "
            "ti.queued_dttm, ti.pool, ti.priority_weight, n.content FROM task_instance ti "
            f"LEFT JOIN task_instance_note n ON n.ti_id = ti.id WHERE ti.dag_id = '{DAG_ID}'"):
        runs[run_id]["tasks"][task_id] = {
            "state": state, "tries": tries, "start": start, "end": end, "scheduled": scheduled, "queued": queued,
            "pool": pool, "weight": weight, "note": note or "", "first_start": start, "first_queued": queued,
            "earlier": []}
    for run_id, task_id, tries, state, start, end, queued in deployment.sql(
            "SELECT run_id, task_id, try_number, state, start_date, end_date, queued_dttm FROM task_instance_history "
            f"WHERE dag_id = '{DAG_ID}' ORDER BY try_number"):
        task = runs[run_id]["tasks"].get(task_id)
        if task is None:
            continue
        task["earlier"].append({"try": tries, "state": state, "start": start, "end": end})
        if start and (task["first_start"] is None or start < task["first_start"]):
            task["first_start"] = start
        if queued and (task["first_queued"] is None or queued < task["first_queued"]):
            task["first_queued"] = queued
    return {"runs": runs, "sampling": sampling, "image": image}


# --- figures ---------------------------------------------------------------------------------------------------------


def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier).total_seconds()


def figures(timeline: dict[str, Any], reference: list[Any]) -> dict[str, Any]:
    import numpy as np

    from airflow_comfy.scheduling.preemption import preemption_count

    runs, sampling, image = timeline["runs"], timeline["sampling"], timeline["image"]
    failed = sorted(r for r, run in runs.items() if run.get("state") != "success")
    order = sorted(runs, key=lambda r: runs[r]["trigger"])
    first_trigger = runs[order[0]]["trigger"]
    normal = [r for r in order if runs[r]["tier"] == "normal"]
    vip = runs["vip"]
    vip_sampling = vip["tasks"][sampling]
    normal_waits = [seconds(runs[r]["tasks"][sampling]["first_start"], runs[r]["trigger"]) for r in normal]
    durations = [seconds(runs[r]["tasks"][sampling]["end"], runs[r]["tasks"][sampling]["start"]) for r in order]
    image_ends = [runs[r]["tasks"][image]["end"] for r in order if runs[r]["tasks"][image]["end"]]

    # A run's decode (image task) waits for a later run's sampling when a normal run triggered after it started
    # sampling after this run's sampling had ended and had finished before this run's image task started.
    decode_waits, decode_lags = [], []
    for i, r in enumerate(normal):
        own = runs[r]["tasks"]
        ready, decode_start = own[sampling]["end"], own[image]["start"]
        if ready is None or decode_start is None:
            continue
        decode_lags.append(seconds(decode_start, ready))
        for later in normal[i + 1:]:
            other = runs[later]["tasks"][sampling]
            if other["first_start"] and other["end"] and other["first_start"] >= ready and other["end"] <= decode_start:
                decode_waits.append((r, later))
    # Normal runs whose sampling task the scheduler queued (first try) in a later loop than that of a run
    # triggered after them: equal weights and no logical date, so Airflow's tie-break need not be FIFO.
    queued = [runs[r]["tasks"][sampling]["first_queued"] for r in normal]
    overtaken = sum(1 for i, q in enumerate(queued)
                    if q and any(later and seconds(q, later) > 0.5 for later in queued[i + 1:]))

    preempted = sorted(r for r in order if preemption_count(runs[r]["tasks"][sampling]["note"]) > 0)
    # How long each preempted run waited to sample again, and how many normal runs triggered after it started
    # sampling meanwhile (its place in the queue: equal weights, ties broken by the runs' logical dates).
    resumed = {}
    for r in preempted:
        task = runs[r]["tasks"][sampling]
        stopped = max((e["end"] for e in task["earlier"] if e["end"]), default=None)
        later = normal[normal.index(r) + 1:] if r in normal else []
        passed = sum(1 for o in later if stopped and runs[o]["tasks"][sampling]["first_start"]
                     and stopped < runs[o]["tasks"][sampling]["first_start"] < task["start"])
        resumed[r] = (seconds(task["start"], stopped), passed)
    identical: dict[str, bool] = {}
    for r in order:
        pngs = sorted((timeline["home"] / "artifacts" / "runs" / DAG_ID / r / "outputs").glob("**/*.png"))
        got = image_pixels(pngs)
        identical[r] = len(got) == len(reference) and all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
    weights = {tier: sorted({t["weight"] for r in order if runs[r]["tier"] == tier for t in runs[r]["tasks"].values()})
               for tier in ("normal", "vip")}
    return {
        "failed": failed,
        "vip_wait": seconds(vip_sampling["first_start"], vip["trigger"]),
        "vip_ready_wait": seconds(vip_sampling["first_start"], vip_sampling["scheduled"]),
        "vip_queued": seconds(vip_sampling["queued"], vip["trigger"]),
        "vip_ready": seconds(vip_sampling["scheduled"], vip["trigger"]),
        "vip_image": seconds(vip["tasks"][image]["end"], vip["trigger"]),
        "normal_wait_median": statistics.median(w for w in normal_waits if w is not None),
        "normal_wait_max": max(w for w in normal_waits if w is not None),
        "sampling_median": statistics.median(d for d in durations if d is not None),
        "drain": seconds(max(run["end"] for run in runs.values() if run.get("end")), first_trigger),
        "first_image": seconds(min(image_ends), first_trigger) if image_ends else None,
        "first_run_image": seconds(runs[normal[0]]["tasks"][image]["end"], first_trigger),
        "decode_waits": decode_waits,
        "decode_lag_median": statistics.median(decode_lags) if decode_lags else None,
        "decode_lag_max": max(decode_lags) if decode_lags else None,
        "overtaken": overtaken,
        "vip_run_note": vip.get("note", ""),
        "vip_run_start": seconds(vip.get("start"), vip["trigger"]),
        "preempted": preempted,
        "resumed": resumed,
        "preemptions": sum(preemption_count(t["note"]) for r in order for t in runs[r]["tasks"].values()),
        "identical": identical,
        "weights": weights,
        "normal_count": len(normal),
        "scenario_seconds": timeline["scenario_seconds"],
    }


def fmt(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def report(name: str, f: dict[str, Any], tasks: tuple[str, str], target: float) -> None:
    sampling, image = tasks
    mark = "" if f["vip_wait"] is None else (" (meets)" if f["vip_wait"] <= target else " (over)")
    ident = f["identical"]
    print(f"[{name}] figures (seconds, from the metadata database; trigger = the REST call):")
    print(f"  VIP trigger -> VIP {sampling} start        {fmt(f['vip_wait'])}   target <= {target:.0f} s{mark}")
    print(f"  VIP {sampling} ready -> its start          {fmt(f['vip_ready_wait'])}   (ready = scheduled_dttm, "
          f"{fmt(f['vip_ready'])} after the trigger; queued {fmt(f['vip_queued'])} after it)")
    print(f"  VIP trigger -> VIP image                   {fmt(f['vip_image'])}")
    print(f"  normal run trigger -> {sampling} start     median {fmt(f['normal_wait_median'])}, "
          f"max {fmt(f['normal_wait_max'])} ({f['normal_count']} runs)")
    print(f"  {sampling} task duration                   median {fmt(f['sampling_median'])} (final try)")
    print(f"  drain: first trigger -> last run finished  {fmt(f['drain'])}")
    print(f"  first trigger -> first finished image      {fmt(f['first_image'])} (the first run's: "
          f"{fmt(f['first_run_image'])})")
    print(f"  decode waited for a later run's sampling   {len(f['decode_waits'])} of {f['normal_count']} runs"
          f"{' ' + str(f['decode_waits'][:5]) if f['decode_waits'] else ''}; {image} start after own {sampling} "
          f"end: median {fmt(f['decode_lag_median'])}, max {fmt(f['decode_lag_max'])}")
    print(f"  normal runs whose {sampling} was queued after a later-triggered run's: {f['overtaken']}")
    held = "ahead of max_active_runs" in f["vip_run_note"]
    print(f"  VIP dag run running {fmt(f['vip_run_start'])} after its trigger"
          f"{' (held by max_active_runs; started by the watcher)' if held else ''}")
    print(f"  weights: normal {f['weights']['normal']}, vip {f['weights']['vip']} (every task of a run: absolute)")
    preempted = f["preempted"]
    same = sum(ident[r] for r in preempted)
    print(f"  preemptions: {f['preemptions']}; preempted runs {preempted or '-'}: pixel-identical to the "
          f"uninterrupted reference {same}/{len(preempted)}; all runs identical {sum(ident.values())}/{len(ident)}")
    for r, (waited, passed) in f["resumed"].items():
        print(f"  preempted run {r} sampled again {fmt(waited)} after it was stopped; {passed} normal run(s) "
              "triggered after it started sampling meanwhile")
    if f["failed"]:
        print(f"  FAILED runs: {f['failed']}")
    print(f"  scenario wall time {f['scenario_seconds']:.0f} s", flush=True)


def verbose_timeline(name: str, timeline: dict[str, Any]) -> None:
    runs, sampling, image = timeline["runs"], timeline["sampling"], timeline["image"]
    order = sorted(runs, key=lambda r: runs[r]["trigger"])
    t0 = runs[order[0]]["trigger"]
    print(f"[{name}] timeline, seconds after the first trigger (tries of {sampling}; history: earlier tries):")
    for r in order:
        s, d = runs[r]["tasks"][sampling], runs[r]["tasks"][image]
        earlier = "; ".join(f"try {e['try']} {e['state']} {fmt(seconds(e['start'], t0), '')}-"
                            f"{fmt(seconds(e['end'], t0), '')}" for e in s["earlier"])
        print(f"  {r:12s} trigger {fmt(seconds(runs[r]['trigger'], t0), ''):>6s}  {sampling} "
              f"{fmt(seconds(s['start'], t0), ''):>6s}-{fmt(seconds(s['end'], t0), ''):>6s} try {s['tries']}  "
              f"{image} {fmt(seconds(d['start'], t0), ''):>6s}-{fmt(seconds(d['end'], t0), ''):>6s}  "
              f"run end {fmt(seconds(runs[r].get('end'), t0), ''):>6s}{'  ' + earlier if earlier else ''}")


def summary(results: dict[str, dict[str, Any]], target: float) -> None:
    names = list(results)
    rows = [
        ("VIP trigger -> sampling start", lambda f: fmt(f["vip_wait"]), f"<= {target:.0f} s"),
        ("VIP ready -> sampling start", lambda f: fmt(f["vip_ready_wait"]), ""),
        ("normal trigger -> sampling (median)", lambda f: fmt(f["normal_wait_median"]), ""),
        ("drain (first trigger -> last end)", lambda f: fmt(f["drain"]), ""),
        ("first trigger -> first image", lambda f: fmt(f["first_image"]), ""),
        ("decode waited for later sampling", lambda f: f"{len(f['decode_waits'])}/{f['normal_count']}", "0"),
        ("preempted runs pixel-identical", lambda f: f"{sum(f['identical'][r] for r in f['preempted'])}/"
                                                     f"{len(f['preempted'])}", "all"),
        ("all runs pixel-identical", lambda f: f"{sum(f['identical'].values())}/{len(f['identical'])}", "all"),
    ]
    print("summary:" + "".join(f"{'preemption ' + n:>18s}" for n in names) + "   target")
    for label, get, goal in rows:
        print(f"  {label:36s}" + "".join(f"{get(results[n]):>18s}" for n in names) + f"   {goal}")


# --- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="normal runs queued before the vip run (default 20)")
    parser.add_argument("--sampling-seconds", type=float, default=60,
                        help="seconds the sampler node takes on one thread, alone (default 60; sets steps)")
    parser.add_argument("--steps", type=int, help="use these steps instead of calibrating")
    parser.add_argument("--slots", type=int, default=2, help="slots of the sampling pool (default 2)")
    parser.add_argument("--preempt-after", type=float, default=2.0,
                        help="[comfy] preempt_after of scenario 'on', seconds (default 2)")
    parser.add_argument("--scenarios", default="off,on", help="off, on or both (default off,on)")
    parser.add_argument("--workflow", default="txt2img", help="example_workflows/<name>.json (default txt2img)")
    parser.add_argument("--parallelism", type=int, default=4, help="LocalExecutor parallelism (default 4)")
    parser.add_argument("--max-active-runs", type=int, default=0,
                        help="the DAG's max_active_runs (default: Airflow's max_active_runs_per_dag, 16)")
    parser.add_argument("--vip-delay", type=float, default=5.0,
                        help="seconds between the pool's saturation and the vip trigger (default 5)")
    parser.add_argument("--logical-dates", action="store_true",
                        help="trigger with the trigger time as logical date (default: none, as the CLI does)")
    parser.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (printed)")
    parser.add_argument("--verbose", action="store_true", help="print every run's timeline")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or any(s not in ("off", "on") for s in scenarios) or args.runs < args.slots:
        parser.error("--scenarios takes off and/or on; --runs must be at least --slots")
    # SIGTERM (make, CI) stops the services too: the finally blocks run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="airflow-comfy-vip-bench-"))
    os.environ["AIRFLOW_HOME"] = str(scratch / "bench-home")  # this process's own Airflow imports touch nothing
    try:
        return run(scratch, args, scenarios)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def run(scratch: Path, args: argparse.Namespace, scenarios: list[str]) -> int:
    from airflow_comfy.local_run import compile_for_run
    from airflow_comfy.runner.models.demo import make_demo_models, write_demo_inputs

    t0 = time.monotonic()
    ensure_postgres()
    workflow = ROOT / "example_workflows" / f"{args.workflow}.json"
    paths = {"scratch": scratch, "models": scratch / "models", "inputs": scratch / "inputs",
             "store": scratch / "reference-store", "workflow": workflow}
    make_demo_models(paths["models"])
    write_demo_inputs(paths["inputs"])
    compiled = compile_for_run(workflow)
    tasks = workflow_tasks(compiled)
    if args.steps:
        steps, note = args.steps, "given"
    else:
        steps, per_step, fixed = calibrate(compiled, paths, args.sampling_seconds)
        note = f"{1 / per_step:.1f} steps/s on one thread (+{fixed:.2f} s), for {args.sampling_seconds:.0f} s"
    print(f"setup: {args.workflow}: {tasks[0]} samples, {tasks[1]} saves the image; steps {steps} ({note}); "
          f"{os.cpu_count()} CPU(s)", flush=True)
    ref_seconds, ref = run_in_process(compiled, paths, steps, "reference")
    reference = image_pixels([Path(i["uri"].removeprefix("file://")) for i in ref.images])
    print(f"setup: uninterrupted reference run: sampler {ref_seconds:.1f} s alone; {len(reference)} image(s); "
          f"setup took {time.monotonic() - t0:.0f} s", flush=True)
    print(f"config: {args.runs} normal runs + 1 vip, pool {POOL} of {args.slots} slots (role sampling), "
          f"LocalExecutor parallelism {args.parallelism}, max_active_runs {args.max_active_runs or 'Airflow default'}, "
          f"vip {args.vip_delay:.0f} s after saturation, preempt_after {args.preempt_after} s, "
          f"{'logical date = trigger time' if args.logical_dates else 'no logical dates'}", flush=True)

    from postgres import PostgresServer

    results: dict[str, dict[str, Any]] = {}
    failed = False
    with PostgresServer() as server:
        for name in scenarios:
            timeline = run_scenario(name, name == "on", server, paths, steps, tasks, args)
            results[name] = figures(timeline, reference)
            if args.verbose:
                verbose_timeline(name, timeline)
            report(name, results[name], tasks, TARGET_SECONDS)
            failed = failed or bool(results[name]["failed"])
            server.drop_database(f"bench_{name}")
    summary(results, TARGET_SECONDS)
    print(f"benchmark took {time.monotonic() - t0:.0f} s (steps {steps}, {args.runs} normal runs, "
          f"{args.slots} slots)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
