"""VIP preemption in a real deployment: Airflow's scheduler (LocalExecutor), dag-processor and api-server on
PostgreSQL, the package's plugin loaded through its ``airflow.plugins`` entry point (the watcher runs inside the
scheduler), the DAG built by the loader stubs from ``txt2img_grouped`` (prompts -> sampling -> decode_and_save),
real runner subprocesses on the tiny demo models.

The sampling group goes to a one-slot pool (role ``sampling`` in the pools file). A ``batch`` run with many
steps takes the slot; a ``vip`` run arrives, its sampling task waits ``preempt_after`` and the batch task is
cleared while running: it stops, the vip task takes the slot, and the batch task runs again in a new try
(without using a retry: it has none) and finishes with the same pixels as an uninterrupted run. Its ``prompts``
group, already finished, is not run again. A second vip run, triggered while the batch task runs again, does not
preempt it a second time (``preempt_max = 1``): it waits. Both sides' logs say what happened.

Two more things a VIP user counts on, in the same scenario. The DAG allows two active runs
(``max_active_runs: 2``): the vip runs arrive while two runs are active and Airflow would hold them
``queued``; the watcher starts them. A second batch run waits for the slot from before the vip run arrived: the
preempted batch task keeps its place and runs before it (its weight went up by one within its tier).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from airflow_deployment import AirflowDeployment
from PIL import Image
from postgres import migrated_airflow_database
from statsd_listener import StatsdListener
from workflow_builders import EXAMPLES, REPO

from airflow_comfy.local_run import compile_for_run, run_workflow

pytestmark = pytest.mark.airflow

DAG_ID = "preempt"
POOL = "preempt_gpu"
BATCH_STEPS = 600
VIP_STEPS = 4
VIP1_STEPS = 150
PREEMPT_AFTER = 1


@pytest.fixture(scope="module")
def deployment(postgres_server, demo_models: Path, demo_inputs: Path, statsd: StatsdListener,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowDeployment]:
    home = tmp_path_factory.mktemp("preempt-airflow")
    dags = home / "dags"
    dags.mkdir()
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(REPO / "dags" / stub, dags)
    shutil.copy(EXAMPLES / "txt2img_grouped.json", dags / f"{DAG_ID}.json")
    (dags / f"{DAG_ID}.comfy.yaml").write_text("retry_delay: 1\nmax_active_runs: 2\n")
    pools = home / "pools.yaml"
    pools.write_text(f"pools:\n  {POOL}: {{slots: 1, gpus: 0, role: sampling}}\n")
    database = migrated_airflow_database(postgres_server, "preempt", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    deployment = AirflowDeployment(home, database, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "AIRFLOW__COMFY__POOLS_FILE": str(pools),
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__MODELS_PATH": str(demo_models),
        "AIRFLOW__COMFY__INPUT_PATH": str(demo_inputs),
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
        "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
        "AIRFLOW__COMFY__RUNNER_SERVICE_DIR": os.environ["AIRFLOW__COMFY__RUNNER_SERVICE_DIR"],  # conftest's
        "AIRFLOW__COMFY__PREEMPT_AFTER": str(PREEMPT_AFTER),
        "AIRFLOW__COMFY__PREEMPT_MAX": "1",
        "COMFY_RUNNER_THREADS": "1",
        # the watcher counts each preemption (comfy.preemptions) through Airflow's StatsD client
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__METRICS__METRICS_ALLOW_LIST": "comfy",
    })
    deployment.airflow("pools", "set", POOL, "1", "airflow-comfy preemption test")
    with deployment:
        deployment.wait_for_dags({DAG_ID})
        yield deployment


def trigger(deployment: AirflowDeployment, run_id: str, tier: str, steps: int) -> None:
    deployment.airflow("dags", "trigger", DAG_ID, "-r", run_id, "-c", json.dumps({"tier": tier, "steps": steps}))


def task(deployment: AirflowDeployment, run_id: str, task_id: str) -> dict:
    rows = deployment.sql(
        "SELECT state, try_number, max_tries, priority_weight, start_date, end_date FROM task_instance "
        f"WHERE dag_id = '{DAG_ID}' AND run_id = '{run_id}' AND task_id = '{task_id}'")
    if not rows:
        return {}
    state, try_number, max_tries, weight, start, end = rows[0]
    return {"state": state, "try": try_number, "max_tries": max_tries, "weight": weight, "start": start, "end": end}


def note(deployment: AirflowDeployment, run_id: str, task_id: str) -> str:
    rows = deployment.sql(
        "SELECT n.content FROM task_instance_note n JOIN task_instance ti ON ti.id = n.ti_id "
        f"WHERE ti.dag_id = '{DAG_ID}' AND ti.run_id = '{run_id}' AND ti.task_id = '{task_id}'")
    return rows[0][0] if rows else ""


def run_note(deployment: AirflowDeployment, run_id: str) -> str:
    rows = deployment.sql(
        "SELECT n.content FROM dag_run_note n JOIN dag_run r ON r.id = n.dag_run_id "
        f"WHERE r.dag_id = '{DAG_ID}' AND r.run_id = '{run_id}'")
    return rows[0][0] if rows else ""


def task_log(deployment: AirflowDeployment, run_id: str, task_id: str, attempt: int) -> str:
    paths = list((deployment.home / "logs").glob(f"dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/"
                                                  f"attempt={attempt}.log"))
    return paths[0].read_text(errors="replace") if paths else ""


def final_image(deployment: AirflowDeployment, run_id: str) -> np.ndarray:
    (path,) = sorted((deployment.home / "artifacts" / "runs" / DAG_ID).glob(f"{run_id}*/outputs/**/*.png"))[:1]
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_vip_run_preempts_a_batch_task_which_runs_again_to_the_same_pixels(
        deployment: AirflowDeployment, demo_models: Path, demo_inputs: Path, tmp_path: Path,
        statsd: StatsdListener):
    started = time.monotonic()
    trigger(deployment, "batch-1", "batch", BATCH_STEPS)
    deployment.wait_for("the batch run's sampling task to run", lambda: task(
        deployment, "batch-1", "sampling").get("state") == "running", timeout=180)
    trigger(deployment, "batch-2", "batch", VIP_STEPS)
    # two runs active: Airflow holds the vip run queued (max_active_runs 2), the watcher starts it
    # the vip run samples long enough for the stopped batch task to be back in the queue when it ends (a
    # stopped try takes a few seconds to wind down and go through up_for_retry)
    trigger(deployment, "vip-1", "vip", VIP1_STEPS)
    vip_triggered = time.monotonic()

    deployment.wait_for("the vip run's sampling task to start", lambda: task(
        deployment, "vip-1", "sampling").get("state") in ("running", "success"), timeout=180)
    waited = time.monotonic() - vip_triggered
    victim = task(deployment, "batch-1", "sampling")
    assert victim["try"] >= 2 or victim["state"] in ("restarting", "up_for_retry", "scheduled", "queued"), victim
    # A second vip run while the batch task runs again: it was preempted once (preempt_max = 1), so it keeps
    # its slot and the second vip run waits for it.
    deployment.wait_for("the batch task to run again", lambda: task(
        deployment, "batch-1", "sampling").get("state") == "running", timeout=240)
    trigger(deployment, "vip-2", "vip", VIP_STEPS)

    def finished(run_id: str):
        def check():
            rows = deployment.sql(f"SELECT state FROM dag_run WHERE dag_id = '{DAG_ID}' AND run_id = '{run_id}'")
            return rows and rows[0][0] in ("success", "failed") and rows[0][0]
        return check

    for run_id in ("vip-1", "batch-1", "vip-2", "batch-2"):
        assert deployment.wait_for(f"run {run_id} to finish", finished(run_id), timeout=400) == "success", (
            run_id, deployment.logs_tail())

    batch = {t: task(deployment, "batch-1", t) for t in ("prompts", "sampling", "decode_and_save")}
    # preempted once, requeued without using a retry (the task has none), run again from its group's start
    assert batch["sampling"]["try"] == 2 and batch["sampling"]["state"] == "success", batch
    assert batch["prompts"]["try"] == 1, batch  # the group it had finished is not run again
    # it kept its place: back in the queue one above its tier's weight, it ran before the batch run that was
    # waiting when it was preempted; the vip run took the slot before that one too
    assert batch["sampling"]["weight"] == batch["prompts"]["weight"] + 1, batch
    batch2 = task(deployment, "batch-2", "sampling")
    waiting_since = deployment.sql(
        f"SELECT scheduled_dttm FROM task_instance WHERE dag_id = '{DAG_ID}' AND run_id = 'batch-2' "
        "AND task_id = 'sampling'")[0][0]
    assert waiting_since < task(deployment, "vip-1", "sampling")["end"], "batch-2 was not waiting yet"
    timeline = deployment.sql(
        "SELECT run_id, try_number, state, start_date, end_date FROM task_instance_history WHERE "
        f"dag_id = '{DAG_ID}' AND task_id = 'sampling' UNION ALL SELECT run_id, try_number, state, start_date, "
        f"end_date FROM task_instance WHERE dag_id = '{DAG_ID}' AND task_id = 'sampling' ORDER BY 4")
    assert batch2["start"] >= batch["sampling"]["end"], timeline
    assert batch2["start"] >= task(deployment, "vip-2", "sampling")["end"], batch2
    # the vip runs did not wait for a place among the DAG's two active runs
    for run_id in ("vip-1", "vip-2"):
        assert "ahead of max_active_runs (2 runs were running)" in run_note(deployment, run_id), run_id
    assert note(deployment, "batch-1", "sampling").startswith("airflow-comfy: preempted 1 time(s); last by run vip-1")
    assert "by preempting task sampling of run batch-1" in note(deployment, "vip-1", "sampling")
    # the second vip run did not take the slot away again: it started after the batch task ended
    vip2 = task(deployment, "vip-2", "sampling")
    assert vip2["start"] >= batch["sampling"]["end"], (vip2, batch["sampling"])
    assert note(deployment, "vip-2", "sampling") == ""
    # both logs say what happened
    assert "Airflow stopped this try while it was running" in task_log(deployment, "batch-1", "sampling", 1)
    assert "preempted by run vip-1 of DAG preempt" in task_log(deployment, "batch-1", "sampling", 2)
    assert "preempted task sampling of run batch-1 of DAG preempt" in task_log(deployment, "vip-1", "sampling", 1)
    # and the metrics: one preemption, of the batch run's sampling task in its pool
    assert statsd.values(f"airflow.comfy.preemptions.{DAG_ID}.sampling.batch.{POOL}") == [(1.0, "c")]
    assert statsd.values("airflow.comfy.preemptions") == [(1.0, "c")]

    # the same pixels as an uninterrupted run of the same params
    compiled = compile_for_run(EXAMPLES / "txt2img_grouped.json")
    reference = run_workflow(compiled, models=demo_models, input_dir=demo_inputs, store=tmp_path.as_uri(),
                             params={"steps": BATCH_STEPS}, run_id="reference", extra_args=["--threads", "1"],
                             in_process=True, echo=lambda _line: None)
    ref_path = Path(reference.images[0]["uri"].removeprefix("file://"))
    with Image.open(ref_path) as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(final_image(deployment, "batch-1"), expected)
    print(f"vip sampling started {waited:.1f} s after its trigger; scenario {time.monotonic() - started:.0f} s")
