"""What an operator of the deployment sees of a run, through a real deployment: Airflow's scheduler
(LocalExecutor), dag-processor and api-server on PostgreSQL, the DAGs built by the loader stubs, real runner
subprocesses on the tiny demo models, and Airflow's own StatsD client sending to a UDP socket bound by this test.

* The metrics: a ``high`` run of ``txt2img_grouped`` (prompts -> sampling -> decode_and_save) sends each group's
  model load, sampling, decode and compute times, bytes handed off, peak RSS and a done count from the task,
  and its queue wait from the scheduler, under names that carry the DAG, the group, the tier and the pool; the
  values agree with the groups' manifests.
* The task log (the file Airflow wrote): the runner's lines arrive without a second timestamp, per node with
  load and compute time and bytes; a run whose input image does not exist has the runner's "bad input" line at
  ERROR level, and its task fails without a retry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_deployment import AirflowDeployment
from postgres import migrated_airflow_database
from statsd_listener import StatsdListener
from workflow_builders import EXAMPLES, REPO

pytestmark = pytest.mark.airflow

GOOD_DAG = "obs_grouped"
BAD_DAG = "obs_img2img"
GROUPS = ("prompts", "sampling", "decode_and_save")
TIER = "high"
POOL = "default_pool"
TIMESTAMP_FIRST = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d")


@pytest.fixture(scope="module")
def deployment(postgres_server, demo_models: Path, demo_inputs: Path, statsd: StatsdListener,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowDeployment]:
    home = tmp_path_factory.mktemp("obs-airflow")
    dags = home / "dags"
    dags.mkdir()
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(REPO / "dags" / stub, dags)
    shutil.copy(EXAMPLES / "txt2img_grouped.json", dags / f"{GOOD_DAG}.json")
    shutil.copy(EXAMPLES / "img2img.json", dags / f"{BAD_DAG}.json")
    database = migrated_airflow_database(postgres_server, "obs", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    deployment = AirflowDeployment(home, database, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__METRICS__METRICS_ALLOW_LIST": "comfy",
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__MODELS_PATH": str(demo_models),
        "AIRFLOW__COMFY__INPUT_PATH": str(demo_inputs),
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
        "AIRFLOW__COMFY__RUNNER_PYTHON": sys.executable,
        "AIRFLOW__COMFY__RUNNER_SERVICE": "False",  # runner subprocesses; the service's relay is the same code
        "COMFY_RUNNER_THREADS": "1",
    })
    with deployment:
        deployment.wait_for_dags({GOOD_DAG, BAD_DAG})
        yield deployment


@pytest.fixture(scope="module")
def runs(deployment: AirflowDeployment) -> dict[str, str]:
    """Trigger the good and the bad run at once and wait for both to end; their states."""
    deployment.airflow("dags", "trigger", GOOD_DAG, "-r", "good", "-c", json.dumps({"tier": TIER, "steps": 3}))
    deployment.airflow("dags", "trigger", BAD_DAG, "-r", "bad", "-c", json.dumps({"image": "missing.png"}))

    def states() -> dict[str, str] | None:
        rows = dict(deployment.sql(f"SELECT dag_id, state FROM dag_run WHERE dag_id IN ('{GOOD_DAG}', '{BAD_DAG}')"))
        return rows if all(rows.get(d) in ("success", "failed") for d in (GOOD_DAG, BAD_DAG)) else None

    return deployment.wait_for("both runs to end", states, timeout=400, interval=1.0)


def task_log_records(deployment: AirflowDeployment, dag_id: str, run_id: str, task_id: str) -> list[dict]:
    """The records of the task log file Airflow wrote for try 1 (JSON lines)."""
    (path,) = (deployment.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/attempt=1.log")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
    return records


def manifest(deployment: AirflowDeployment, group: str) -> dict:
    (path,) = (deployment.home / "artifacts" / "runs" / GOOD_DAG).glob(f"good*/{group}/try-1/manifest.json")
    return json.loads(path.read_text())


def named(metric: str, group: str) -> str:
    return f"airflow.{metric}.{GOOD_DAG}.{group}.{TIER}.{POOL}"


def test_a_run_sends_its_group_metrics_to_statsd(deployment: AirflowDeployment, runs: dict[str, str],
                                                statsd: StatsdListener):
    assert runs[GOOD_DAG] == "success", deployment.logs_tail()
    # the scheduler looks for started groups every few seconds
    try:
        deployment.wait_for("the queue wait of every group", lambda: all(
            statsd.values(named("comfy.group.queue_wait", group)) for group in GROUPS), timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- StatsD lines received ---\n" + "\n".join(statsd.lines[-60:])) from None
    for group in GROUPS:
        totals = manifest(deployment, group)["stats"]["totals"]
        ((load, kind),) = statsd.values(named("comfy.group.model_load", group))
        assert kind == "ms" and load > 0  # every group loads (or replays) the checkpoint
        assert load == pytest.approx(totals["model_load_s"] * 1000, abs=0.01)
        assert statsd.values(named("comfy.group.done", group)) == [(1.0, "c")]
        ((rss, kind),) = statsd.values(named("comfy.group.peak_rss", group))
        assert kind == "g" and rss == totals["peak_rss_bytes"] > 10 * 2**20
        ((wait, kind),) = statsd.values(named("comfy.group.queue_wait", group))
        assert kind == "ms" and 0 <= wait < 400_000
        assert not statsd.values(named("comfy.group.peak_cuda", group))  # no CUDA here
    prompts, sampling, decode = (manifest(deployment, group)["stats"]["totals"] for group in GROUPS)
    ((sampled, _),) = statsd.values(named("comfy.group.sampling", "sampling"))
    assert sampled > 0 and sampled == pytest.approx(sampling["sampling_s"] * 1000, abs=0.01)
    ((decoded, _),) = statsd.values(named("comfy.group.decode", "decode_and_save"))
    assert decoded > 0
    # bytes handed off: what prompts wrote, sampling read; what sampling wrote, decoding read
    assert statsd.values(named("comfy.group.bytes_out", "prompts")) == [(prompts["bytes_out"], "c")]
    assert prompts["bytes_out"] == sampling["bytes_in"] > 0
    assert sampling["bytes_out"] == decode["bytes_in"] > 0
    assert statsd.values(named("comfy.group.bytes_in", "decode_and_save")) == [(decode["bytes_in"], "c")]
    ((image_bytes, _),) = statsd.values(named("comfy.group.image_bytes", "decode_and_save"))
    assert image_bytes == decode["image_bytes"] > 0
    # the tag-less names arrive too (for backends that keep tags: here StatsD drops them)
    assert len(statsd.values("airflow.comfy.group.model_load")) >= len(GROUPS)


def test_the_task_log_has_the_runners_lines_once_stamped_with_node_figures(deployment: AirflowDeployment,
                                                                          runs: dict[str, str]):
    assert runs[GOOD_DAG] == "success", deployment.logs_tail()
    records = task_log_records(deployment, GOOD_DAG, "good", "sampling")
    events = [str(r["event"]) for r in records]
    stamped = [e for e in events if TIMESTAMP_FIRST.match(e)]
    assert not stamped, f"lines with a second timestamp: {stamped[:5]}"
    spec_sha256 = manifest(deployment, "sampling")["spec_sha256"]
    assert any(e.startswith("Running: group sampling: spec file://") and f"(sha256 {spec_sha256})" in e
               for e in events), events[:40]
    (figures,) = [e for e in events if re.match(r"node \d+ \(KSampler\): model load 0\.00 s, compute \d", e)]
    assert "read " in figures and "wrote " in figures
    assert any(e.startswith("group totals: model load ") for e in events)
    # the runner's INFO lines stay INFO, without the level word
    infos = [r for r in records if r.get("level") == "info" and str(r["event"]).startswith("node ")]
    assert infos and not any(str(r["event"]).startswith("INFO ") for r in records)


def test_bad_input_is_an_error_line_in_the_task_log_and_not_retried(deployment: AirflowDeployment,
                                                                      runs: dict[str, str]):
    assert runs[BAD_DAG] == "failed"
    ((state, tries),) = deployment.sql(
        f"SELECT state, try_number FROM task_instance WHERE dag_id = '{BAD_DAG}' AND run_id = 'bad' "
        "AND task_id = 'load_and_encode_the_image'")
    assert (state, tries) == ("failed", 1)
    records = task_log_records(deployment, BAD_DAG, "bad", "load_and_encode_the_image")
    runner_lines = [r for r in records if "airflow-comfy runner: bad input: " in str(r["event"])]
    assert runner_lines, [r["event"] for r in records][-30:]
    (line,) = [r for r in runner_lines if str(r["event"]).startswith("airflow-comfy runner: bad input: ")]
    assert line["level"] == "error"
    assert "node 10 (LoadImage): input 'image'" in line["event"] and "missing.png" in line["event"]
    assert not [r for r in records if TIMESTAMP_FIRST.match(str(r["event"]))]
