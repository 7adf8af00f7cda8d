"""Tiers chosen per run, in a real deployment: Airflow's scheduler (LocalExecutor), dag-processor and api-server
(execution and REST API) on a PostgreSQL metadata database (tests/postgres.py, tests/airflow_deployment.py).

Both DAGs are built from workflow files by the loader stub, as in any deployment; their groups run a stand-in
runner (``[comfy] runner_python`` points at a script that sleeps and writes the manifest the task expects).
The policy is loaded as Airflow loads it: through the ``airflow.policy`` entry point (pluggy), in every process.
When the installed ``airflow-comfy`` is not this checkout's (a shared virtualenv installed from elsewhere), a
distribution that declares the entry point exactly as ``pyproject.toml`` does is put on the services' path; a
separate test checks that the package's own metadata declares it.

* ``tiers_weights`` (img2img: four tasks, a fan-in; sidecar ``priority: high``, ``@daily``; its pool has no
  slot, so its tasks never run): the weight every task instance is stored with, for runs triggered (as
  ``airflow dags trigger`` and through the REST API) with each tier and without one, for the run the scheduler
  itself creates, and, as a control, for a vip run created with ``is_noop`` put back (the trap: the task's
  own weight).
* ``tiers_queue`` (txt2img as one task, default tier ``normal``, a pool of one slot, each task ~2 s): ten
  ``batch`` runs queue up, then a ``vip`` run is triggered; its task is the next one the scheduler starts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from airflow_deployment import AirflowDeployment
from postgres import migrated_airflow_database
from workflow_builders import EXAMPLES, REPO

pytestmark = pytest.mark.airflow

WEIGHTS = {"vip": 10_000, "high": 1_000, "normal": 100, "batch": 1}
RUNNER_SLEEP_SECONDS = 2
QUEUE_POOL, PARKED_POOL = "tiers_one_slot", "tiers_parked"

FAKE_RUNNER = f"""#!/bin/sh
# Stands in for `python -m airflow_comfy.runner run ... --manifest-out FILE`: sleeps, then writes a manifest.
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--manifest-out" ]; then out="$2"; fi
  shift
done
sleep {RUNNER_SLEEP_SECONDS}
printf '{{"manifest_uri": "file:///fake/manifest.json"}}' > "$out"
"""

POOLS_SCRIPT = textwrap.dedent(f"""
    from airflow.models.pool import Pool
    Pool.create_or_update_pool({QUEUE_POOL!r}, slots=1, description="tiers test: one slot", include_deferred=False)
    Pool.create_or_update_pool({PARKED_POOL!r}, slots=0, description="tiers test: tasks never run",
                               include_deferred=False)
""")

# Triggers runs as `airflow dags trigger` does (the same function, in one interpreter for all of them), in a
# process that loaded Airflow's policy plugins at import. argv[1]: a list of requests, each {dag_id, run_id,
# conf?, logical_date?, trap?} (a trigger) or {pool, slots} (resize a pool). A request with "trap" first puts
# back is_noop=True, the flag Airflow leaves for entry-point hooks. Prints when each run was committed.
TRIGGER_SCRIPT = textwrap.dedent("""
    import json, sys
    from datetime import datetime, timezone
    from airflow import settings
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import ParamValidationError
    from airflow.models.pool import Pool
    from airflow.utils.types import DagRunTriggeredByType

    hook = settings.task_instance_mutation_hook
    result = {"is_noop": hook.is_noop, "refused": [], "committed": {},
              "plugins": sorted(name for name, _ in settings.get_policy_plugin_manager().list_name_plugin())}
    for request in json.loads(sys.argv[1]):
        if "pool" in request:
            Pool.create_or_update_pool(request["pool"], slots=request["slots"], description="tiers test",
                                       include_deferred=False)
            continue
        if request.get("trap"):
            hook.is_noop = True
        kwargs = {"conf": request["conf"]} if "conf" in request else {}
        if request.get("logical_date"):
            kwargs["logical_date"] = datetime.fromisoformat(request["logical_date"])
        try:
            trigger_dag(request["dag_id"], run_id=request["run_id"], triggered_by=DagRunTriggeredByType.CLI,
                        **kwargs)
        except ParamValidationError as exc:
            result["refused"].append([request["run_id"], str(exc)])
        else:
            result["committed"][request["run_id"]] = datetime.now(timezone.utc).isoformat()
    print("RESULT " + json.dumps(result))
""")


#: The ``airflow.policy`` entry point pyproject.toml declares (checked by the last test): name, object reference.
POLICY_ENTRY_POINT = ("airflow_comfy", "airflow_comfy.scheduling.policy")


def installed_policy_entry_point() -> str | None:
    """The object reference of the installed ``airflow-comfy``'s policy entry point (None if it has none)."""
    name, _ = POLICY_ENTRY_POINT
    try:
        dist = importlib.metadata.distribution("airflow-comfy")
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [ep.value for ep in dist.entry_points if ep.group == "airflow.policy" and ep.name == name]
    return found[0] if found else None


def policy_path(folder: Path) -> list[str]:
    """What goes first on the services' PYTHONPATH: this checkout, and, unless the installed package already
    declares the policy entry point, a distribution (in ``folder``) that declares it as pyproject.toml does."""
    name, value = POLICY_ENTRY_POINT
    if installed_policy_entry_point() == value:
        return [str(REPO)]
    info = folder / "airflow_comfy_policy_entry_point-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: airflow-comfy-policy-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[airflow.policy]\n{name} = {value}\n")
    return [str(REPO), str(folder)]


@pytest.fixture(scope="module")
def deployment(postgres_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowDeployment]:
    started = time.monotonic()
    home = tmp_path_factory.mktemp("tiers-airflow")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "comfy_workflows.py", dags)
    shutil.copy(EXAMPLES / "img2img.json", dags / "tiers_weights.json")
    (dags / "tiers_weights.comfy.yaml").write_text(
        f'priority: high\nschedule: "@daily"\ncatchup: false\npool: {PARKED_POOL}\n')
    shutil.copy(EXAMPLES / "txt2img.json", dags / "tiers_queue.json")
    (dags / "tiers_queue.comfy.yaml").write_text(f"slicing: single\npool: {QUEUE_POOL}\n")
    runner = home / "fake-runner"
    runner.write_text(FAKE_RUNNER)
    runner.chmod(runner.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    database = migrated_airflow_database(postgres_server, "tiers", {**os.environ, "AIRFLOW_HOME": str(home)},
                                         airflow_bin=str(Path(sys.executable).with_name("airflow")))
    pythonpath = [*policy_path(Path(tempfile.mkdtemp(dir=home, prefix="entry-points-"))),
                  os.environ.get("PYTHONPATH", "")]
    deployment = AirflowDeployment(home, database, dags, env={
        "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p),
        "AIRFLOW__COMFY__RUNNER_PYTHON": str(runner),
        "AIRFLOW__COMFY__RUNNER_SERVICE": "false",  # a stand-in runner runs no service
        "AIRFLOW__COMFY__ARTIFACT_STORE": f"file://{home}/artifacts",
        "AIRFLOW__COMFY__CACHE_DIR": str(home / "comfy-cache"),
    })
    deployment.python(POOLS_SCRIPT)
    with deployment:
        deployment.wait_for_dags({"tiers_weights", "tiers_queue"})
        deployment.wait_for_api()
        print(f"deployment ready in {time.monotonic() - started:.1f} s")
        yield deployment


def trigger(deployment: AirflowDeployment, requests: list[dict]) -> dict:
    result = deployment.python(TRIGGER_SCRIPT, json.dumps(requests))
    # the policy came in through the entry point, and it told verify_integrity that a hook exists
    assert "airflow_comfy" in result["plugins"], result
    assert result["is_noop"] is False, result
    return result


def stored_weights(deployment: AirflowDeployment, dag_id: str) -> dict[str, dict[str, int]]:
    rows = deployment.sql(f"SELECT run_id, task_id, priority_weight FROM task_instance WHERE dag_id = '{dag_id}'")
    weights: dict[str, dict[str, int]] = {}
    for run_id, task_id, weight in rows:
        weights.setdefault(run_id, {})[task_id] = weight
    return weights


def test_the_metadata_database_stores_each_runs_tier_weight(deployment: AirflowDeployment):
    tiers = list(WEIGHTS)
    result = trigger(deployment, [
        *({"dag_id": "tiers_weights", "run_id": f"conf-{tier}", "conf": {"tier": tier}} for tier in tiers),
        {"dag_id": "tiers_weights", "run_id": "no-conf"},
        {"dag_id": "tiers_weights", "run_id": "other-conf", "conf": {"prompt": "a fox"}},
        {"dag_id": "tiers_weights", "run_id": "bad-tier", "conf": {"tier": "urgent"}},
        # the trap: with is_noop left True (an entry-point hook without airflow_local_settings), Airflow
        # bulk-inserts the task instances without calling the hook: this vip run keeps the tasks' own weight
        {"dag_id": "tiers_weights", "run_id": "trap-vip", "conf": {"tier": "vip"}, "trap": True},
    ])
    assert [run_id for run_id, _ in result["refused"]] == ["bad-tier"]  # the tier param is an enum
    # the trigger form and REST API: the api-server creates the task instances
    for run_id, conf, status in (("api-vip", {"tier": "vip"}, 200), ("api-no-tier", {"seed": 3}, 200),
                                 ("api-bad-tier", {"tier": "urgent"}, 400)):
        answer = deployment.rest("POST", "/api/v2/dags/tiers_weights/dagRuns",
                                 {"dag_run_id": run_id, "logical_date": None, "conf": conf})
        assert answer[0] == status, answer
    # the run the scheduler creates itself (@daily, no conf): the sidecar's tier

    def with_scheduled_run():
        weights = stored_weights(deployment, "tiers_weights")
        return any(run_id.startswith("scheduled__") and len(t) == 4 for run_id, t in weights.items()) and weights

    weights = deployment.wait_for("the scheduler to create the scheduled run's task instances",
                                  with_scheduled_run, timeout=60)
    expected = {f"conf-{tier}": WEIGHTS[tier] for tier in tiers}
    expected.update({"no-conf": WEIGHTS["high"], "other-conf": WEIGHTS["high"], "trap-vip": WEIGHTS["high"],
                     "api-vip": WEIGHTS["vip"], "api-no-tier": WEIGHTS["high"]})
    (scheduled,) = [run_id for run_id in weights if run_id.startswith("scheduled__")]
    expected[scheduled] = WEIGHTS["high"]
    tasks = {"prompts", "load_and_encode_the_image", "sample", "decode_and_save"}
    assert weights == {run_id: dict.fromkeys(tasks, weight) for run_id, weight in expected.items()}
    print("stored weights:", json.dumps({run_id: sorted(set(t.values())) for run_id, t in weights.items()}))


def test_a_vip_run_starts_before_the_queued_batch_runs(deployment: AirflowDeployment):
    started = time.monotonic()

    def run(index: int, tier: str) -> dict:
        return {"dag_id": "tiers_queue", "run_id": f"{tier}-{index:02d}", "conf": {"tier": tier},
                "logical_date": f"2024-02-01T{index:02d}:00:00+00:00"}

    trigger(deployment, [run(i, "batch") for i in range(10)])
    # the queue is there: a batch task holds the pool's one slot, the other runs wait for it
    deployment.wait_for("a batch task to take the pool slot", lambda: deployment.sql(
        "SELECT 1 FROM task_instance WHERE dag_id = 'tiers_queue' AND queued_dttm IS NOT NULL"), timeout=60)
    # The vip run comes last, the newest: first-in-first-out would start it last. The pool is closed while it is
    # triggered, so that no scheduler loop that began before the vip run was committed can hand a freed slot to
    # a batch task after it: from then on every choice the scheduler makes sees the vip run.
    committed = trigger(deployment, [{"pool": QUEUE_POOL, "slots": 0}, run(10, "vip"),
                                     {"pool": QUEUE_POOL, "slots": 1}])["committed"]["vip-10"]

    def vip_done():
        rows = deployment.sql("SELECT state FROM task_instance WHERE dag_id = 'tiers_queue' AND run_id = 'vip-10'")
        return rows and rows[0][0] in ("success", "failed")

    deployment.wait_for("the vip run's task to finish", vip_done, timeout=90)
    rows = deployment.sql(
        "SELECT ti.run_id, ti.state, ti.priority_weight, ti.queued_dttm, ti.start_date, dr.created_at "
        "FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id "
        "WHERE ti.dag_id = 'tiers_queue' ORDER BY ti.queued_dttm NULLS LAST, ti.run_id")
    tis = {run_id: {"state": state, "weight": weight, "queued": queued, "started": start, "created": created}
           for run_id, state, weight, queued, start, created in rows}
    vip = tis.pop("vip-10")
    assert vip["state"] == "success", (vip, deployment.logs_tail())
    assert vip["weight"] == WEIGHTS["vip"] and {t["weight"] for t in tis.values()} == {WEIGHTS["batch"]}
    # batch tasks the scheduler queued before the vip run was committed may have run first; none after it
    committed_at = datetime.fromisoformat(committed)
    assert vip["created"] <= committed_at
    before = sorted(run_id for run_id, t in tis.items() if t["queued"] is not None and t["queued"] < committed_at)
    ahead = sorted(run_id for run_id, t in tis.items() if t["queued"] is not None and t["queued"] < vip["queued"])
    assert ahead == before, f"batch tasks queued after the vip run was triggered but before its task: {rows}"
    assert all(t["started"] is None or t["started"] > vip["started"] for run_id, t in tis.items()
               if run_id not in before), rows
    waiting = [run_id for run_id in tis if run_id not in before]
    assert len(waiting) >= 7, f"the vip run jumped too short a queue: {rows}"
    print(f"vip started after {len(before)} batch task(s) taken before it was triggered, ahead of "
          f"{len(waiting)} waiting; {time.monotonic() - started:.1f} s")


def test_the_package_declares_the_policy_entry_point(tmp_path: Path):
    """The package's own metadata (PEP 517 ``prepare_metadata_for_build_wheel``, as pip builds it) registers
    the policy module in Airflow's ``airflow.policy`` group."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                               "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = tmp_path / proc.stdout.strip().splitlines()[-1]
    entry_points = (info / "entry_points.txt").read_text(encoding="utf-8")
    name, value = POLICY_ENTRY_POINT
    assert f"[airflow.policy]\n{name} = {value}\n" in entry_points
