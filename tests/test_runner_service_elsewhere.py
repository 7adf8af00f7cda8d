"""A runner service that runs elsewhere (``[comfy] runner_service_socket``): the docker-compose stack's design, with
the Airflow worker in one container and the runner (torch) in another, sharing only the socket's folder, the
models folder and the artifact store.

No containers here: two processes with different environments. The service is started by hand
(``python -m airflow_comfy.runner serve``) with an environment of its own (its own HOME, TMPDIR, working folder
and process variables, no AWS credentials, no Airflow settings) and, where ``unshare --mount`` is permitted (as
root), in a mount namespace whose /tmp holds only the shared folders: the worker's temporary files are out of
its sight, as in another container. The worker is ``airflow dags test`` (the DAG factory's stubs, the local
operator) or the local operator in this test process, with another environment.

* a DAG run's groups run as jobs of that service, against an S3 server whose credentials only the worker has;
  the task never starts a service and never runs a runner subprocess;
* with no service at the socket (none there, or a stale socket file), the try fails as retryable, in a sentence
  naming the socket and the compose service, and nothing runs on the worker;
* a task waits for its turn while another task uses the service;
* the setting is checked (absolute, short enough, not with ``local_gpus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from recording_log import RecordingLog
from s3_server import moto_s3_server

from airflow_comfy.config import get_settings
from airflow_comfy.local_run import compile_for_run
from airflow_comfy.operators import GroupTaskConfig, build_group_task
from airflow_comfy.operators.command import PARAMS_TEMPLATE, RUN_KEY_TEMPLATE, TRY_TEMPLATE
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.runner_service import client
from airflow_comfy.workflow.groupspec import GroupSpec

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = ROOT / "example_workflows" / "txt2img.json"
START_TIMEOUT = 180.0
FAKE_KEY_ID = "AKIAFAKEELSEWHERE042"
FAKE_SECRET = "fake-elsewhere-secret-Qq9Ww8"



@dataclass
class Service:
    socket: Path
    pid: int
    log: Path
    isolated: bool
    """Whether the service runs in a mount namespace of its own (see :func:`isolated_command`)."""


#: Runs "$@" in a mount namespace whose /tmp is an empty tmpfs but for the folders named in $SHARED (re-mounted
#: at their own paths) and the service's HOME: what a container sees of the worker's files.
ISOLATE = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs none /mnt
i=0
for path in $SHARED; do mkdir -p "/mnt/$i"; mount --bind "$path" "/mnt/$i"; i=$((i + 1)); done
mount -t tmpfs none /tmp
i=0
for path in $SHARED; do mkdir -p "$path"; mount --bind "/mnt/$i" "$path"; i=$((i + 1)); done
mkdir -p "$HOME/tmp"
exec "$@"
"""


def isolated_command(command: list[str]) -> list[str] | None:
    """``command`` in a mount namespace of its own (``unshare --mount``, which needs CAP_SYS_ADMIN: root here);
    None where that is not permitted."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return [unshare, "--mount", "sh", "-c", ISOLATE, "isolate", *command]


def image_folders() -> list[Path]:
    """What the runner image holds of this machine's /tmp: the code and the interpreter's environment, where a
    checkout (CI's fresh clone) and its virtualenv live under /tmp."""
    tmp = Path("/tmp")
    return [path for path in (ROOT, Path(sys.prefix).resolve()) if path.is_relative_to(tmp) and path != tmp]


def service_environment(home: Path) -> dict[str, str]:
    """The runner container's environment: nothing of the worker's but PATH (to find the same interpreter)."""
    (home / "tmp").mkdir(parents=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home / "tmp"), "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "2", "COMFY_RUNNER_THREADS": "1"}


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """The folder both sides share (the compose stack's socket volume); short: socket paths are limited."""
    path = Path(tempfile.mkdtemp(prefix="acx-", dir="/tmp"))
    path.chmod(0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def started_service(sock: Path, home: Path, shared: list[Path]) -> Iterator[Service]:
    """``python -m airflow_comfy.runner serve`` started by hand in the runner container's environment, where
    permitted in a mount namespace that sees of this machine's /tmp only the ``shared`` folders; stopped at the
    end."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "service.log"
    command = [sys.executable, "-m", "airflow_comfy.runner", "serve", "--socket", str(sock), "--idle-timeout", "3600"]
    isolated = isolated_command(command)
    env = {**service_environment(home), "SHARED": " ".join(str(path) for path in shared + image_folders())}
    with open(log, "wb") as out:
        process = subprocess.Popen(isolated or command, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while client.request(sock) is None:
            assert process.poll() is None, f"the service exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the service did not answer:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield Service(socket=sock, pid=process.pid, log=log, isolated=isolated is not None)
    finally:
        client.request(sock, "stop")
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def service(shared: Path, demo_models: Path, demo_inputs: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with started_service(shared / "runner.sock", tmp_path_factory.mktemp("runner-container"),
                         [shared, demo_models, demo_inputs]) as running:
        yield running


def test_the_service_sees_only_the_shared_folders(service: Service, shared: Path, demo_models: Path,
                                                  tmp_path: Path):
    """What the service's process sees of the files (its root, as /proc shows it): the shared folders, not the
    worker's own temporary files."""
    if not service.isolated:
        pytest.skip("no mount namespace here (unshare --mount is not permitted): the service sees every file")
    (tmp_path / "worker-only").write_text("x")
    root = Path(f"/proc/{service.pid}/root")
    assert (root / str(shared).lstrip("/") / "runner.sock").exists()
    assert (root / str(demo_models).lstrip("/") / "checkpoints").is_dir()
    assert not (root / str(tmp_path / "worker-only").lstrip("/")).exists()


# --- a DAG run through airflow dags test ---------------------------------------------------------------------------


def test_a_dag_run_runs_its_groups_in_the_service_elsewhere(service: Service, demo_models: Path, demo_inputs: Path,
                                                            tmp_path: Path, airflow_env, run_airflow):
    import boto3

    home = tmp_path / "airflow"
    dags = home / "dags"
    dags.mkdir(parents=True)
    for stub in ("comfy_workflows.py", "comfy_workflow_errors.py"):
        shutil.copy(ROOT / "dags" / stub, dags / stub)
    shutil.copy(TXT2IMG, dags / TXT2IMG.name)
    with moto_s3_server() as endpoint:
        bucket = f"comfy-{uuid.uuid4().hex[:12]}"
        aws = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(home / "aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials")}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=FAKE_KEY_ID,
                          aws_secret_access_key=FAKE_SECRET, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        env = airflow_env(home, dags, artifact_store=f"s3://{bucket}/comfy", models_path=str(demo_models),
                          input_path=str(demo_inputs), cache_dir=str(home / "cache"),
                          runner_service_socket=str(service.socket))
        # the worker's own process variables differ from the service's: they stay on the worker
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(aws, OMP_NUM_THREADS="3", COMFY_RUNNER_THREADS="1")
        run_airflow("db", "migrate", env=env)
        proc = run_airflow("dags", "test", "txt2img", "-c", json.dumps({"steps": 3}), env=env, timeout=600)
        output = proc.stdout + proc.stderr
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="comfy/runs/txt2img/")
                .get("Contents", [])]

    assert "state=success" in output, output[-6000:]
    ran = [line for line in output.splitlines() if f"ran in the warm runner service (pid {service.pid}," in line]
    assert len(ran) == 2, output[-6000:]  # both groups: inference and postprocess
    assert "starting a runner service" not in output
    assert "running a runner subprocess instead" not in output
    assert [key for key in keys if "/outputs/" in key and key.endswith(".png")], keys
    status = client.request(service.socket)
    assert status is not None and status["jobs"] >= 2
    assert FAKE_SECRET not in service.log.read_text()
    assert not [p for p in service.socket.parent.iterdir() if p.name.startswith("manifest-")]  # cleaned up


# --- the local operator in this process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    return compile_for_run(TXT2IMG, single_group=True)


def group_task(compiled, models: Path, inputs: Path, store: Path, socket_path: Path, run: str, *,
               steps: int = 2, env: dict[str, str] | None = None) -> ComfyGroupLocalOperator:
    """The txt2img example as one group's task, its arguments rendered, connecting to ``socket_path`` only."""
    spec = GroupSpec.from_dict(compiled.groups[0]["spec"])
    defaults = {p["name"]: p["default"] for p in compiled.params}
    settings = get_settings(artifact_store=store.as_uri(), models_path=str(models), input_path=str(inputs),
                            runner_python="")
    task = build_group_task(spec, task_config=GroupTaskConfig(env={"COMFY_RUNNER_THREADS": "1", **(env or {})}),
                            settings=settings, upstream_task_ids=[], task_id=f"main_{run}")
    assert isinstance(task, ComfyGroupLocalOperator)
    rendered = {RUN_KEY_TEMPLATE: f"dag/{run}", TRY_TEMPLATE: "1",
                PARAMS_TEMPLATE: json.dumps({**defaults, "steps": steps})}
    task.arguments = [rendered.get(arg, arg) for arg in task.arguments]
    task.runner_service_socket = str(socket_path)
    task.local_gpus = ""
    task._cached_logger = RecordingLog()
    return task


def log_text(task: ComfyGroupLocalOperator) -> str:
    return task._cached_logger.text()  # type: ignore[attr-defined]


def stale_socket(path: Path) -> Path:
    """A socket file nobody listens on (what a killed service leaves)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path


@pytest.mark.parametrize("leftover", ["nothing", "a stale socket file", "no folder"])
def test_no_service_at_the_socket_fails_the_try_as_retryable_naming_it(
        leftover: str, compiled, demo_models: Path, demo_inputs: Path, tmp_path: Path, shared: Path):
    folder = shared / f"absent-{uuid.uuid4().hex[:6]}"
    if leftover != "no folder":
        folder.mkdir(mode=0o700)
    path = folder / "runner.sock"
    if leftover == "a stale socket file":
        stale_socket(path)
    task = group_task(compiled, demo_models, demo_inputs, tmp_path / "store", path, "absent")
    with pytest.raises(AirflowException) as caught:
        task.execute({})
    assert not isinstance(caught.value, AirflowFailException)  # retried: the service may be (re)starting
    message = str(caught.value)
    assert f"The runner service at {path} ([comfy] runner_service_socket) cannot run this group" in message
    assert "the 'runner' service" in message
    text = log_text(task)
    assert "Running:" not in text and "subprocess" not in text  # nothing ran on the worker
    assert not (tmp_path / "store" / "runs").exists()


def test_a_task_waits_for_its_turn_at_the_service(service: Service, compiled, demo_models: Path,
                                                  demo_inputs: Path, tmp_path: Path):
    busy = client._try_lock(service.socket.with_suffix(".busy"))  # another task's job runs
    assert busy is not None
    task = group_task(compiled, demo_models, demo_inputs, service.socket.parent / "store", service.socket, "turn")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(manifest=task.execute({})), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "waiting for the runner service at" not in log_text(task):
            assert time.monotonic() < deadline, log_text(task)
            time.sleep(0.05)
        time.sleep(1)
        assert "Running:" not in log_text(task)  # still waiting
    finally:
        os.close(busy)
    thread.join(START_TIMEOUT)
    assert result.get("manifest", {}).get("images"), log_text(task)
    assert f"ran in the warm runner service (pid {service.pid}," in log_text(task)


def test_a_job_whose_process_variables_differ_is_refused_and_fails_the_try(
        service: Service, compiled, demo_models: Path, demo_inputs: Path, tmp_path: Path):
    """A sidecar env that sets a variable the service reads once: the service cannot honour it."""
    task = group_task(compiled, demo_models, demo_inputs, service.socket.parent / "store", service.socket, "alloc",
                      env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    with pytest.raises(AirflowException) as caught:
        task.execute({})
    assert not isinstance(caught.value, AirflowFailException)
    assert "refused the job: the job's process environment differs from the service's (PYTORCH_CUDA_ALLOC_CONF)" \
        in str(caught.value)
    assert "Running:" not in log_text(task)


def test_a_service_that_dies_during_the_job_fails_the_try_as_retryable(
        shared: Path, compiled, demo_models: Path, demo_inputs: Path, tmp_path: Path):
    with started_service(shared / "dying.sock", tmp_path / "runner-container",
                         [shared, demo_models, demo_inputs]) as dying:
        task = group_task(compiled, demo_models, demo_inputs, shared / "store", dying.socket, "dies", steps=10000)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                task.execute({})
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while "sampling: step 2/" not in log_text(task):
            assert time.monotonic() < deadline and thread.is_alive(), log_text(task)
            time.sleep(0.05)
        os.kill(dying.pid, signal.SIGKILL)
        thread.join(60)
    error = result["error"]
    assert isinstance(error, AirflowException) and not isinstance(error, AirflowFailException)
    assert "ended during the job without an exit status" in str(error)
    assert "docker compose logs runner" in str(error) and "The next try waits for it at its socket" in str(error)


def test_only_the_store_and_runner_variables_go_with_the_job(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    monkeypatch.setenv("COMFY_RUNNER_PRECISION", "fp32")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:secret@postgres/airflow")
    monkeypatch.setenv("PYTHONPATH", "/opt/airflow")
    task = ComfyGroupLocalOperator(task_id="t", arguments=["run"], env={"COMFY_RUNNER_THREADS": "1"})
    forwarded = task.forwarded_env()
    assert forwarded["AWS_ACCESS_KEY_ID"] == "worker-key" and forwarded["COMFY_RUNNER_PRECISION"] == "fp32"
    assert forwarded["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and forwarded["COMFY_RUNNER_THREADS"] == "1"
    assert not [name for name in forwarded if not name.startswith(("AWS_", "COMFY_"))]
    from_connection = task.forwarded_env({"AWS_ACCESS_KEY_ID": "conn-key"})
    assert from_connection["AWS_ACCESS_KEY_ID"] == "conn-key"


def test_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE_SOCKET", "/run/airflow-comfy/runner.sock")
    assert get_settings().runner_service_socket == "/run/airflow-comfy/runner.sock"
    monkeypatch.setenv("AIRFLOW__COMFY__LOCAL_GPUS", "0")
    with pytest.raises(ValueError, match="runner_service_socket .* and local_gpus .* cannot be set together"):
        get_settings()
    monkeypatch.delenv("AIRFLOW__COMFY__LOCAL_GPUS")
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE_SOCKET", "runner.sock")
    with pytest.raises(ValueError, match="must be an absolute path"):
        get_settings()
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE_SOCKET", "/" + "x" * 120)
    with pytest.raises(ValueError, match="longest Unix socket path"):
        get_settings()
