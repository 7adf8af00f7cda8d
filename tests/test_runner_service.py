"""The warm runner service (``python -m airflow_comfy.runner serve``) and the local operator's use of it, with real
processes: real services on temporary sockets, real runner subprocesses, the tiny demo models.

* a GroupSpec run through the service writes the same PNG bytes and manifest hashes as its runner subprocess,
  and the task log has the same lines (plus one saying where it ran); the second job finds its model cached;
* a killed task's job stops within a few seconds (between sampler steps) and gives its device lock back, and
  the next job runs in the same service;
* a service killed with SIGKILL during a job fails the try as retryable, and the next try gets a fresh service;
* a service that cannot be used means a subprocess; a job whose process environment differs is refused;
* the model cache's memory budget evicts the least recently used entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from recording_log import RecordingLog

from airflow_comfy.artifacts.store import file_uri_path
from airflow_comfy.config import get_settings
from airflow_comfy.local_run import compile_for_run
from airflow_comfy.operators import GroupTaskConfig, build_group_task
from airflow_comfy.operators.command import PARAMS_TEMPLATE, RUN_KEY_TEMPLATE, TRY_TEMPLATE
from airflow_comfy.operators.devices import DeviceLocks
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.operators.spec_publish import publish_group_spec
from airflow_comfy.runner_service import client, protocol
from airflow_comfy.workflow.groupspec import GroupSpec

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = ROOT / "example_workflows" / "txt2img.json"
DEADLINE = 120.0
#: A KSampler with this many steps runs for minutes on the demo model: long enough to be stopped mid-way.
MANY_STEPS = 10000



@pytest.fixture(scope="module")
def compiled():
    return compile_for_run(TXT2IMG, single_group=True)


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A runtime folder with a short path (socket paths are limited to 107 bytes); its services are stopped
    at the end."""
    path = Path(tempfile.mkdtemp(prefix="acs-", dir="/tmp"))
    path.chmod(0o700)
    try:
        yield path
    finally:
        client.stop_all(path)
        shutil.rmtree(path, ignore_errors=True)


class Tasks:
    """Local group tasks running txt2img (one group) on the demo models, with plain (rendered) arguments."""

    def __init__(self, compiled, models: Path, inputs: Path, root: Path, runtime: Path):
        self.compiled, self.models, self.inputs, self.root, self.runtime = compiled, models, inputs, root, runtime
        self.spec = GroupSpec.from_dict(compiled.groups[0]["spec"])
        self.defaults = {p["name"]: p["default"] for p in compiled.params}

    def task(self, run: str, *, service: bool = True, params: dict[str, Any] | None = None,
             local_gpus: str = "", runtime: Path | None = None) -> ComfyGroupLocalOperator:
        settings = get_settings(artifact_store=(self.root / "store").as_uri(), models_path=str(self.models),
                                input_path=str(self.inputs), runner_python="")
        task = build_group_task(self.spec, task_config=GroupTaskConfig(env={"COMFY_RUNNER_THREADS": "1"}),
                                settings=settings, upstream_task_ids=[], task_id=f"main_{run}")
        assert isinstance(task, ComfyGroupLocalOperator)
        rendered = {RUN_KEY_TEMPLATE: f"dag/{run}", TRY_TEMPLATE: "1",
                    PARAMS_TEMPLATE: json.dumps({**self.defaults, **(params or {})})}
        task.arguments = [rendered.get(arg, arg) for arg in task.arguments]
        task.runner_service = service
        task.runner_service_dir = str(runtime or self.runtime)
        task.local_gpus = local_gpus
        task.device_lock_dir = str(self.root / "locks")
        task.device_poll_seconds = 0.05
        task._cached_logger = RecordingLog()
        return task

    def locks(self, devices: str = "0") -> DeviceLocks:
        return DeviceLocks(devices.split(","), 1, self.root / "locks")


@pytest.fixture
def tasks(compiled, demo_models: Path, demo_inputs: Path, tmp_path: Path, runtime: Path) -> Tasks:
    return Tasks(compiled, demo_models, demo_inputs, tmp_path, runtime)


def log_of(task: ComfyGroupLocalOperator) -> RecordingLog:
    return task._cached_logger  # type: ignore[attr-defined, return-value]


def images(manifest: dict[str, Any]) -> list[bytes]:
    return [Path(file_uri_path(image["uri"])).read_bytes() for image in manifest["images"]]


def hashes(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a manifest says about the bytes written: images, outputs, models (not timings, run key, URIs)."""
    return {"images": [(i["filename"], i["sha256"], i["width"], i["height"]) for i in manifest["images"]],
            "outputs": [{k: v for k, v in o.items() if k != "uri"} for o in manifest["outputs"]],
            "models": manifest["models"]}


def runner_lines(task: ComfyGroupLocalOperator) -> list[str]:
    """The runner's own lines of a task log, numbers (times, counts, run ids) blanked."""
    lines = log_of(task).lines
    start = next(i for i, line in enumerate(lines) if line.startswith("Running: "))
    end = next(i for i, line in enumerate(lines) if line.startswith("manifest: "))
    return [re.sub(r"\d+", "N", line) for line in lines[start + 1:end + 1]]


def start(task: ComfyGroupLocalOperator) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["manifest"] = task.execute({})
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            result["error"] = exc
        result["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sampling(task: ComfyGroupLocalOperator, step: int = 3) -> Callable[[], bool]:
    return lambda: any(f"sampling: step {step}/" in line for line in list(log_of(task).lines))


def service_pid(runtime: Path) -> int:
    (sock,) = runtime.glob("*.sock")
    status = client.request(sock)
    assert status is not None and status["type"] == "status"
    return int(status["pid"])


# --- same bytes, same log, warm cache ----------------------------------------------------------------------------


def test_the_service_writes_what_the_subprocess_writes_and_keeps_the_model(tasks: Tasks, runtime: Path):
    plain = tasks.task("r1", service=False)
    cold = tasks.task("r2")
    warm = tasks.task("r3")
    manifests = [task.execute({}) for task in (plain, cold, warm)]

    assert images(manifests[0]) and images(manifests[1]) == images(manifests[0]) == images(manifests[2])
    assert hashes(manifests[1]) == hashes(manifests[0]) == hashes(manifests[2])
    # the task log: the subprocess's lines, then one saying where the job ran and what the model cache did
    assert runner_lines(cold) == runner_lines(plain) == runner_lines(warm)
    assert "warm runner service" not in log_of(plain).text()
    (cold_line,) = [line for line in log_of(cold).lines if "ran in the warm runner service" in line]
    (warm_line,) = [line for line in log_of(warm).lines if "ran in the warm runner service" in line]
    assert "a service started for it" in cold_line and "0 hit(s), 1 load(s) from disk" in cold_line
    assert "already warm" in warm_line and re.search(r"[1-9]\d* hit\(s\), 0 load\(s\) from disk", warm_line)
    pid = re.search(r"pid (\d+)", warm_line).group(1)  # type: ignore[union-attr]
    assert f"pid {pid}" in cold_line and int(pid) == service_pid(runtime)
    assert any("0/896 tensors read" in line for line in log_of(warm).lines)  # the loader's own line says so too


# --- cancel -------------------------------------------------------------------------------------------------------


def test_a_killed_task_stops_its_job_between_steps_and_gives_the_device_back(tasks: Tasks, runtime: Path):
    long = tasks.task("r1", params={"steps": MANY_STEPS}, local_gpus="0")
    thread, result = start(long)
    wait_until(sampling(long), "the job to sample")
    assert list(runtime.glob("gpu-0.slot0-*.sock"))  # the service of GPU 0's slot
    assert tasks.locks().try_acquire("probe") is None  # the task holds the device (and the service with it)
    pid = service_pid(runtime)
    killed = time.monotonic()
    long.on_kill()
    thread.join(DEADLINE)
    assert result["ended"] - killed < 5, f"the job took {result['ended'] - killed:.1f} s to stop"
    assert isinstance(result["error"], AirflowException)
    assert not isinstance(result["error"], AirflowFailException)
    lease = tasks.locks().try_acquire("probe")  # the device is free again
    assert lease is not None
    lease.release()
    assert "the task asked to cancel" in log_of(long).text()
    assert f"sampling: step {MANY_STEPS}/{MANY_STEPS}" not in log_of(long).text()

    after = tasks.task("r2", local_gpus="0")
    assert after.execute({})["images"]
    assert f"runner service (pid {pid}" in log_of(after).text()  # the same service


def test_a_job_that_ignores_cancel_ends_its_service(tasks: Tasks, runtime: Path):
    """A job that does not reach a node or step boundary in time: the service exits after its grace period,
    the device is free at once, the next try starts a fresh service."""
    long = tasks.task("r1", params={"steps": MANY_STEPS}, local_gpus="0")
    long.service_cancel_grace = 0.0  # no step ends within no time
    thread, result = start(long)
    wait_until(sampling(long), "the job to sample")
    pid = service_pid(runtime)
    long.on_kill()
    thread.join(DEADLINE)
    assert isinstance(result["error"], AirflowException)
    wait_until(lambda: not client._alive(pid), "the service to exit", 10)
    lease = tasks.locks().try_acquire("probe")
    assert lease is not None
    lease.release()
    after = tasks.task("r2", local_gpus="0")
    assert after.execute({})["images"]
    assert "a service started for it" in log_of(after).text()


TASK_PROCESS = r"""
import json, signal, sys
from airflow_comfy.operators.local import ComfyGroupLocalOperator

class PrintLog:
    def _add(self, message, *args, **_):
        print(message % args if args else message, flush=True)
    info = warning = error = debug = exception = _add

arguments, runtime = json.loads(sys.argv[1]), sys.argv[2]
task = ComfyGroupLocalOperator(task_id="main", arguments=arguments, env={"COMFY_RUNNER_THREADS": "1"},
                               runner_service=True, runner_service_dir=runtime, local_gpus="")
task._cached_logger = PrintLog()
signal.signal(signal.SIGTERM, lambda signum, frame: task.on_kill())  # what Airflow's task runner does
try:
    task.execute({})
    print("RESULT ok", flush=True)
except BaseException as exc:
    print(f"RESULT {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
"""


def test_sigterm_to_the_task_process_cancels_its_job(tasks: Tasks, runtime: Path, tmp_path: Path):
    """As Airflow stops a task (timeout, clear, preemption): SIGTERM to the task's process, whose handler calls
    on_kill while execute() waits on the service's socket."""
    long = tasks.task("r1", params={"steps": MANY_STEPS})  # its arguments, for a task in another process
    publish_group_spec(long.group_spec, long.spec_sha256, long.store, log=log_of(long))
    script = tmp_path / "task.py"
    script.write_text(TASK_PROCESS)
    process = subprocess.Popen([sys.executable, str(script), json.dumps(long.arguments), str(runtime)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("sampling: step 3/" in line for line in list(lines)), "the job to sample")
        pid = service_pid(runtime)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(DEADLINE)
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    text = "".join(lines)
    assert took < 5, f"the task took {took:.1f} s to stop:\n{text[-3000:]}"
    assert "RESULT AirflowException: the runner was killed by SIGTERM" in text, text[-3000:]  # exit code -15
    assert "the task asked to cancel" in text
    after = tasks.task("r2")
    assert after.execute({})["images"]
    assert f"runner service (pid {pid}" in log_of(after).text()


# --- a crash ------------------------------------------------------------------------------------------------------


def test_a_service_killed_during_the_job_fails_the_try_as_retryable(tasks: Tasks, runtime: Path):
    long = tasks.task("r1", params={"steps": MANY_STEPS}, local_gpus="0")
    thread, result = start(long)
    wait_until(sampling(long), "the job to sample")
    pid = service_pid(runtime)
    os.kill(pid, signal.SIGKILL)
    thread.join(DEADLINE)
    error = result["error"]
    assert isinstance(error, AirflowException) and not isinstance(error, AirflowFailException)
    assert re.search(rf"runner service \(pid {pid}\) ended during the job without an exit status", str(error))
    lease = tasks.locks().try_acquire("probe")  # the kernel dropped the service's hold of the lock
    assert lease is not None
    lease.release()

    after = tasks.task("r2", local_gpus="0")
    assert after.execute({})["images"]
    assert "a service started for it" in log_of(after).text()
    assert service_pid(runtime) != pid


# --- fallback -----------------------------------------------------------------------------------------------------


def test_no_usable_service_means_a_subprocess(tasks: Tasks, tmp_path: Path, runtime: Path):
    (tmp_path / "a-file").write_text("")
    task = tasks.task("r1", runtime=tmp_path / "a-file" / "services")
    assert task.execute({})["images"]
    text = log_of(task).text()
    assert "cannot use the runtime folder" in text and "running a runner subprocess instead" in text
    assert "warm runner service" not in text

    busy = client._try_lock(runtime / f"cpu.0-{client.fingerprint(sys.executable, dict(task.subprocess_env()))}.busy")
    assert busy is not None  # another task uses the only CPU slot
    try:
        other = tasks.task("r2")
        assert other.execute({})["images"]
        assert "runner service slot(s) for this worker are busy" in log_of(other).text()
    finally:
        os.close(busy)


def test_the_service_refuses_a_job_from_another_process_environment(tasks: Tasks, runtime: Path):
    tasks.task("r1").execute({})
    (sock_path,) = runtime.glob("*.sock")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "7"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        protocol.send(sock, {"op": "run", "version": protocol.VERSION, "argv": ["run"], "env": env, "cwd": "/"})
        answer = protocol.FrameReader(sock).read()
    assert answer is not None and answer["type"] == "refused"
    assert "CUDA_VISIBLE_DEVICES" in answer["reason"]


def test_a_custom_runner_command_never_uses_the_service(tasks: Tasks):
    task = tasks.task("r1")
    task.runner_command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(AirflowException, match="exit code 3"):
        task.execute({})
    assert "runner service" not in log_of(task).text()


# --- settings and layering -------------------------------------------------------------------------------------------


def test_settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AIRFLOW__COMFY__RUNNER_SERVICE_DIR", raising=False)  # conftest's, for the test session
    defaults = get_settings()
    assert defaults.runner_service is True and defaults.runner_service_dir == ""
    assert (defaults.runner_service_idle_timeout, defaults.runner_service_cache_mb,
            defaults.runner_service_cpu_slots) == (600.0, 8192.0, 1)
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE", "false")
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE_CPU_SLOTS", "2")
    assert (get_settings().runner_service, get_settings().runner_service_cpu_slots) == (False, 2)
    monkeypatch.setenv("AIRFLOW__COMFY__RUNNER_SERVICE_CPU_SLOTS", "0")
    with pytest.raises(ValueError, match="runner_service_cpu_slots"):
        get_settings()


def test_the_task_side_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import airflow_comfy.operators.local, airflow_comfy.runner_service.client
        print(sorted(m for m in sys.modules if m in ("torch", "numpy", "airflow_comfy.runner")
                     or m.startswith("airflow_comfy.runner.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"
    client_only = "import sys, airflow_comfy.runner_service.client; print('airflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", client_only], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "False"


def test_names_and_environment():
    env = {"CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "s", "COMFY_RUNNER_THREADS": "2",
           "PYTHONPATH": "/x", "LC_ALL": "C"}
    assert client.service_env(env) == {"CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin", "PYTHONPATH": "/x", "LC_ALL": "C"}
    same = client.fingerprint("/py", env)
    assert client.fingerprint("/py", {**env, "AWS_SECRET_ACCESS_KEY": "t", "COMFY_RUNNER_THREADS": "1"}) == same
    assert client.fingerprint("/py", {**env, "CUDA_VISIBLE_DEVICES": "1"}) != same
    assert client.fingerprint("/other/py", env) != same
    assert client.slot_name("0", 1) == "gpu-0.slot1"
    assert client.slot_name("MIG-1234/5", 0) == "gpu-MIG-1234_5.slot0"


# --- the model cache's memory budget --------------------------------------------------------------------------------


@pytest.fixture
def budget_caches() -> Iterator[Callable[[int], Any]]:
    """New caches (taken out of the process's list afterwards), with the budget reset afterwards."""
    from airflow_comfy.runner.models import cache

    made: list[cache.ModelCache] = []

    def make(size: int) -> cache.ModelCache:
        made.append(cache.ModelCache(size))
        return made[-1]

    saved = list(cache._ALL)
    cache._ALL[:] = []  # the process's own caches stay out of this test's budget
    try:
        yield make
    finally:
        cache.set_memory_budget(None)
        cache._ALL[:] = saved


def test_a_memory_budget_evicts_the_least_recently_used_model(budget_caches: Callable[[int], Any]):
    import torch

    from airflow_comfy.runner.models import cache

    mib = 2**20
    checkpoints, vaes = budget_caches(1), budget_caches(1)
    module = torch.nn.Linear(256, 1024, bias=False)  # 1 MiB of float32 weights
    assert cache.tensor_bytes(module) == mib
    assert cache.tensor_bytes({"a": module, "b": [module, module.weight]}) == mib  # shared storage counts once

    cache.set_memory_budget(3 * mib)  # room for three 1 MiB models, whatever each cache's size
    checkpoints.put("a", torch.zeros(mib // 4))
    checkpoints.put("b", torch.zeros(mib // 4))
    vaes.put("c", torch.zeros(mib // 4))
    assert checkpoints.keys() == ["a", "b"] and vaes.keys() == ["c"]
    assert checkpoints.get("a") is not None  # "b" is now the least recently used
    vaes.put("d", torch.zeros(mib // 4))
    assert checkpoints.keys() == ["a"] and vaes.keys() == ["c", "d"]
    assert vaes.get("zzz") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.nbytes, stats.budget) == (1, 1, 3, 3 * mib, 3 * mib)

    vaes.put("huge", torch.zeros(mib))  # 4 MiB: over the whole budget, not kept, nothing else evicted
    assert vaes.keys() == ["c", "d"] and checkpoints.keys() == ["a"]

    cache.set_memory_budget(mib)  # a smaller budget evicts at once, least recently used first
    assert checkpoints.keys() == [] and vaes.keys() == ["d"]

    cache.set_memory_budget(None)  # back to sizes: one entry per cache
    vaes.put("e", torch.zeros(1))
    assert vaes.keys() == ["e"]


def test_a_model_evicted_after_a_job_is_given_back(budget_caches: Callable[[int], Any]):
    """The service freezes what outlives a job (so that the next job's collection scans only its own objects);
    a model dropped from the cache later, even one held in reference cycles, is still collected."""
    import gc
    import weakref

    import torch

    from airflow_comfy.runner import service
    from airflow_comfy.runner.models import cache

    @dataclasses.dataclass
    class Model:  # a loaded model that refers to itself (modules, hooks and closures often do)
        weights: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(2**18))  # 1 MiB
        me: Any = None

        def __post_init__(self) -> None:
            self.me = self

    mib = 2**20
    models = budget_caches(1)
    cache.set_memory_budget(mib)
    try:
        first = Model()
        gone = weakref.ref(first)
        models.put("first", first)
        del first
        service._free_memory()  # the end of a job: the cached model is frozen with the rest
        assert gc.get_freeze_count() > 0 and gone() is not None
        models.put("second", Model())  # the budget holds one: the first goes
        service._free_memory()  # the end of the next job
        assert gone() is None
    finally:
        gc.unfreeze()
