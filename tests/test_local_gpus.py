"""GPUs on a local worker (``[comfy] local_gpus``): which groups take a device, the devices ``auto`` finds, and
the per-device locks, with real runner subprocesses (a stand-in that records its environment and runs until
the test lets it finish) and tasks in threads or processes. No GPU is needed: the lock hands out device names,
and the runner only sees ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowTaskTimeout
from recording_log import RecordingLog
from workflow_builders import EXAMPLES

from airflow_comfy.config import get_settings
from airflow_comfy.factory.compile import compile_workflow
from airflow_comfy.factory.loader import build_dag
from airflow_comfy.factory.sidecar import parse_sidecar
from airflow_comfy.operators import GroupTaskConfig, build_group_task
from airflow_comfy.operators.devices import (
    DeviceLocks,
    detect_gpus,
    group_needs_gpu,
    model_nodes,
    parse_cuda_visible_devices,
    parse_gpu_list,
    parse_nvidia_smi,
    resolve_gpus,
    run_nvidia_smi,
)
from airflow_comfy.operators.local import ComfyGroupLocalOperator
from airflow_comfy.scheduling.pools import PoolsConfig
from airflow_comfy.workflow.catalog import load_catalog
from airflow_comfy.workflow.groupspec import GroupSpec
from airflow_comfy.workflow.loader import read_workflow_file

REPO = Path(__file__).resolve().parent.parent
#: Upper bound of every wait in this file (the runners start in a fraction of a second).
DEADLINE = 30.0

# --- which groups take a device -------------------------------------------------------------------------------


def spec(group: str, nodes: dict[str, str], recipes: tuple[str, ...] = ()) -> GroupSpec:
    return GroupSpec(workflow_name="wf", workflow_sha256="0" * 64, group=group,
                     nodes={node_id: {"class_type": class_type, "inputs": {}} for node_id, class_type in nodes.items()},
                     recipe_nodes=list(recipes))


SAMPLE = spec("sample", {"4": "CheckpointLoaderSimple", "3": "KSampler"}, ("4",))
ENCODE = spec("encode", {"4": "CheckpointLoaderSimple", "6": "CLIPTextEncode"}, ("4",))
DECODE = spec("decode", {"4": "CheckpointLoaderSimple", "8": "VAEDecode", "9": "SaveImage"}, ("4",))
UPSCALE = spec("upscale", {"7": "UpscaleModelLoader", "8": "ImageUpscaleWithModel", "9": "SaveImage"}, ("7",))
IMAGES = spec("images", {"1": "LoadImage", "2": "ImageScale", "3": "ImageInvert", "4": "SaveImage"})
LATENTS = spec("latents", {"1": "EmptyLatentImage", "2": "LatentUpscaleBy", "3": "ConditioningCombine"})


def test_groups_with_a_model_node_need_a_gpu():
    for needs in (SAMPLE, ENCODE, DECODE, UPSCALE):
        assert group_needs_gpu(needs), needs.group
    for image_only in (IMAGES, LATENTS):
        assert not group_needs_gpu(image_only) and model_nodes(image_only) == []
    assert model_nodes(DECODE) == ["4", "8"]
    # a model node without its recipe listed (a hand-made spec), a sampler by role, a node nobody declares
    assert group_needs_gpu(spec("vae", {"8": "VAEDecode"}))
    assert group_needs_gpu(spec("s", {"3": "SamplerCustom"}))
    assert group_needs_gpu(spec("custom", {"1": "LoadImage", "2": "SomeCustomSegmenter"}))


def compile_example(name: str, sidecar_text: str | None = None):
    path = EXAMPLES / name
    sidecar = parse_sidecar(sidecar_text or "", str(path) + ".comfy.yaml")
    return compile_workflow(path, read_workflow_file(path), sidecar, load_catalog([]), max_nodes=2_000), sidecar


def test_real_workflows_pass_needs_gpu_to_their_local_tasks():
    settings = get_settings(backend="local", cache_dir="")
    for name in ("img2img.json", "esrgan_upscale.json", "txt2img.json"):
        compiled, sidecar = compile_example(name)
        dag = build_dag(compiled, sidecar, settings, pools=PoolsConfig())
        assert {task.needs_gpu for task in dag.tasks} == {True}, name
    # loading and scaling the image in a group of its own: no model node, so no device
    groups = "groups: {load_image: ['10', '11'], encode: ['12'], prompts: ['2', '3'], sample: ['13'], decode: ['14', '15']}"
    compiled, sidecar = compile_example("img2img.json", groups)
    dag = build_dag(compiled, sidecar, settings, pools=PoolsConfig())
    needs = {task.task_id: task.needs_gpu for task in dag.tasks}
    assert needs.pop("load_image") is False and set(needs.values()) == {True}, needs
    # built by hand from a spec, the operator works it out itself
    assert ComfyGroupLocalOperator(task_id="t", arguments=["run"], group_spec=IMAGES).needs_gpu is False
    assert ComfyGroupLocalOperator(task_id="t", arguments=["run"], group_spec=SAMPLE).needs_gpu is True
    assert ComfyGroupLocalOperator(task_id="t", arguments=["run"]).needs_gpu is False


# --- which devices -----------------------------------------------------------------------------------------

NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e2e1a3c-0d5c-8b1e-7f0a-3c2b9e4d6f10)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-a1b2c3d4-e5f6-a7b8-c9d0-e1f2a3b4c5d6)
GPU 2: NVIDIA L4 (UUID: GPU-0f9e8d7c-6b5a-4938-2716-05f4e3d2c1b0)
"""
NVIDIA_SMI_MIG = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-11111111-2222-3333-4444-555555555555)
  MIG 3g.20gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
  MIG 3g.20gb     Device  1: (UUID: MIG-ffffffff-0000-1111-2222-333333333333)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-66666666-7777-8888-9999-000000000000)
"""


def test_nvidia_smi_output():
    assert parse_nvidia_smi(NVIDIA_SMI_L) == ("0", "1", "2")
    assert parse_nvidia_smi(NVIDIA_SMI_MIG) == ("MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                                                "MIG-ffffffff-0000-1111-2222-333333333333", "1")
    assert parse_nvidia_smi("") == ()
    assert parse_nvidia_smi("No devices were found\n") == ()


def test_cuda_visible_devices():
    assert parse_cuda_visible_devices("0,1,3") == ("0", "1", "3")
    assert parse_cuda_visible_devices(" 2 , 03 ") == ("2", "3")
    assert parse_cuda_visible_devices("GPU-5e2e1a3c-0d5c,1") == ("GPU-5e2e1a3c-0d5c", "1")
    # as CUDA reads it: the list ends at the first entry that is not a device
    for none in ("", "-1", "NoDevFiles", "void"):
        assert parse_cuda_visible_devices(none) == (), none
    assert parse_cuda_visible_devices("1,-1,2") == ("1",)
    assert parse_cuda_visible_devices("1,1") == ("1",)


def test_auto_prefers_cuda_visible_devices_then_nvidia_smi():
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: NVIDIA_SMI_L) == (
        ("2", "3"), "CUDA_VISIBLE_DEVICES='2,3'")
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: NVIDIA_SMI_L)[0] == ()  # set to nothing: none
    assert detect_gpus({}, lambda: NVIDIA_SMI_L) == (("0", "1", "2"), "nvidia-smi -L")
    assert detect_gpus({}, lambda: None)[0] == ()
    assert resolve_gpus("auto", {}, lambda: NVIDIA_SMI_L)[0] == ("0", "1", "2")
    assert resolve_gpus(" AUTO ", {"CUDA_VISIBLE_DEVICES": "1"}, lambda: NVIDIA_SMI_L)[0] == ("1",)
    assert resolve_gpus("", {"CUDA_VISIBLE_DEVICES": "1"})[0] == ()
    assert resolve_gpus("0,1,3", {"CUDA_VISIBLE_DEVICES": "5"})[0] == ("0", "1", "3")


def test_nvidia_smi_is_run_when_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_nvidia_smi() is None  # not installed: no devices, no error
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\ncat <<'EOF'\n{NVIDIA_SMI_L}EOF\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")  # ours first, and cat
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == (("0", "1", "2"), "nvidia-smi -L")
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn't communicate with the driver'\n"
                    "exit 9\n")
    assert run_nvidia_smi() is None


def test_explicit_lists_and_bad_settings():
    assert parse_gpu_list("0,1,3") == ("0", "1", "3")
    assert parse_gpu_list("0, GPU-5e2e1a3c-0d5c-8b1e, MIG-aaaa-bbbb,") == ("0", "GPU-5e2e1a3c-0d5c-8b1e",
                                                                          "MIG-aaaa-bbbb")
    with pytest.raises(ValueError, match=r"\[comfy\] local_gpus: 'cuda:1' is not a device"):
        parse_gpu_list("0,cuda:1")
    with pytest.raises(ValueError, match="device 1 is listed twice"):
        parse_gpu_list("1,01")
    with pytest.raises(ValueError, match="local_gpus: 'all' is not a device"):
        get_settings(local_gpus="all")
    with pytest.raises(ValueError, match="runners_per_gpu must be at least 1"):
        get_settings(runners_per_gpu=0)
    defaults = get_settings()
    assert (defaults.local_gpus, defaults.runners_per_gpu) == ("", 1)
    assert defaults.device_lock_dir == f"{os.environ['AIRFLOW_HOME']}/comfy/gpu-locks"


# --- the locks, with real runner subprocesses ------------------------------------------------------------------

GPU_RUNNER = r'''
"""A stand-in for the runner: records the devices it was given, then runs until the file FAKE_WAIT_FOR exists
(at most 30 s), then writes its manifest."""
import json, os, sys, time

args = sys.argv[1:]
manifest_out = args[args.index("--manifest-out") + 1]
name = os.environ["FAKE_NAME"]
seen = {key: os.environ.get(key) for key in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "COMFY_RUNNER_DEVICE")}
seen.update(has_cuda_visible_devices="CUDA_VISIBLE_DEVICES" in os.environ, pid=os.getpid(),
            fds=sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
record = os.path.join(os.environ["FAKE_RECORD_DIR"], name + ".json")
with open(record + ".tmp", "w") as f:
    json.dump(seen, f)
os.replace(record + ".tmp", record)
print(f"gpu runner {name}: CUDA_VISIBLE_DEVICES={seen['CUDA_VISIBLE_DEVICES']!r}", flush=True)
wait_for = os.environ.get("FAKE_WAIT_FOR")
deadline = time.monotonic() + 30
while wait_for and not os.path.exists(wait_for):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.02)
if os.environ.get("FAKE_EXIT"):
    sys.exit(int(os.environ["FAKE_EXIT"]))
with open(manifest_out, "w") as f:
    json.dump({"manifest_uri": f"file:///x/{name}/manifest.json"}, f)
'''



class Bench:
    """Tasks whose runners wait for the test, and what their runners saw."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.record = tmp_path / "record"
        self.record.mkdir()
        self.locks = tmp_path / "locks"
        self.runner = tmp_path / "gpu_runner.py"
        self.runner.write_text(GPU_RUNNER)
        self.threads: list[threading.Thread] = []
        self.results: dict[str, dict[str, Any]] = {}

    def task(self, name: str, *, local_gpus: str | None = "0,1", runners_per_gpu: int | None = 1,
             needs_gpu: bool = True, env: dict[str, str] | None = None) -> ComfyGroupLocalOperator:
        task = ComfyGroupLocalOperator(
            task_id=name,
            arguments=["run", "--store", f"file://{self.root}/store", "--run-key", "dag/run1"],
            runner_command=[sys.executable, str(self.runner)],
            env={"FAKE_NAME": name, "FAKE_RECORD_DIR": str(self.record),
                 "FAKE_WAIT_FOR": str(self.root / f"finish-{name}"), **(env or {})},
            needs_gpu=needs_gpu, local_gpus=local_gpus, runners_per_gpu=runners_per_gpu,
            device_lock_dir=None if local_gpus is None else str(self.locks),
        )
        task.device_poll_seconds = 0.05
        task._cached_logger = RecordingLog()
        return task

    def start(self, task: ComfyGroupLocalOperator, context: dict[str, Any] | None = None) -> None:
        result = self.results[task.task_id] = {}

        def run() -> None:
            try:
                result["manifest"] = task.execute(context or {})
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                result["error"] = exc

        thread = threading.Thread(target=run, name=task.task_id, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self, name: str) -> None:
        (self.root / f"finish-{name}").touch()

    def seen(self, name: str, timeout: float = DEADLINE) -> dict[str, Any]:
        path = self.record / f"{name}.json"
        wait_until(path.exists, timeout, f"runner {name} to start")
        return json.loads(path.read_text())

    def started(self, name: str) -> bool:
        return (self.record / f"{name}.json").exists()

    def join(self, name: str) -> dict[str, Any]:
        thread = next(t for t in self.threads if t.name == name)
        thread.join(DEADLINE)
        assert not thread.is_alive(), f"task {name} did not end"
        return self.results[name]

    def stop_all(self) -> None:
        for thread in self.threads:
            self.finish(thread.name)
        for thread in self.threads:
            thread.join(DEADLINE)


def wait_until(condition: Callable[[], Any], timeout: float = DEADLINE, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def bench(tmp_path: Path):
    bench = Bench(tmp_path)
    yield bench
    bench.stop_all()


def free_slots(locks: DeviceLocks) -> list[str]:
    """The devices of the slots nobody holds (each taken and given back at once)."""
    leases = []
    while (lease := locks.try_acquire("probe")) is not None:
        leases.append(lease)
    for lease in leases:
        lease.release()
    return [lease.device for lease in leases]


def test_two_tasks_get_two_devices_and_a_third_waits_for_one(bench: Bench):
    a, b, c = bench.task("a"), bench.task("b"), bench.task("c")
    bench.start(a, {"ti": StubTI("a")})
    bench.start(b, {"ti": StubTI("b")})
    seen_a, seen_b = bench.seen("a"), bench.seen("b")
    assert {seen_a["CUDA_VISIBLE_DEVICES"], seen_b["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    assert seen_a["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert seen_a["COMFY_RUNNER_DEVICE"] is None  # the runner's device stays auto: cuda:0 is its one device
    locks = DeviceLocks(["0", "1"], 1, bench.locks)
    assert free_slots(locks) == []
    holders = locks.holders()
    assert any("dag/a manual__1 try 1 (pid " in line for line in holders), holders

    bench.start(c)
    wait_until(lambda: "waiting for a GPU" in c.log.text(), what="c to wait")
    time.sleep(0.3)
    assert not bench.started("c")
    assert "waiting for a GPU (all 2 held: by GPU " in c.log.text() and "dag/b manual__1 try 1" in c.log.text()

    bench.finish("a")
    assert bench.join("a")["manifest"] == {"manifest_uri": "file:///x/a/manifest.json"}
    assert "Released GPU " + seen_a["CUDA_VISIBLE_DEVICES"] in a.log.text()
    assert bench.seen("c")["CUDA_VISIBLE_DEVICES"] == seen_a["CUDA_VISIBLE_DEVICES"]
    assert f"got GPU {seen_a['CUDA_VISIBLE_DEVICES']} after waiting" in c.log.text()
    bench.finish("b")
    bench.finish("c")
    assert "manifest" in bench.join("b") and "manifest" in bench.join("c")
    assert sorted(free_slots(locks)) == ["0", "1"]


class StubTI:
    def __init__(self, task_id: str):
        self.dag_id, self.task_id, self.run_id, self.try_number = "dag", task_id, "manual__1", 1


def test_runners_per_gpu_lets_runners_share_a_card(bench: Bench):
    # two devices, two runners each: the first two spread over the devices, the next two share them
    tasks = [bench.task(name, runners_per_gpu=2) for name in "abcd"]
    for task in tasks[:2]:
        bench.start(task)
    assert {bench.seen("a")["CUDA_VISIBLE_DEVICES"], bench.seen("b")["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    for task in tasks[2:]:
        bench.start(task)
    assert sorted(bench.seen(name)["CUDA_VISIBLE_DEVICES"] for name in "abcd") == ["0", "0", "1", "1"]
    # one device, two runners: two run at once on it, a third waits
    one = [bench.task(name, local_gpus="3", runners_per_gpu=2) for name in ("e", "f", "g")]
    for task in one:
        bench.start(task)
    wait_until(lambda: sum(map(bench.started, "efg")) >= 2, what="two of e, f, g")
    time.sleep(0.3)
    started = [name for name in "efg" if bench.started(name)]
    assert len(started) == 2, started
    waiting = next(name for name in "efg" if not bench.started(name))
    first = started[0]
    bench.finish(first)
    assert bench.seen(waiting)["CUDA_VISIBLE_DEVICES"] == "3"
    assert {bench.seen(name)["CUDA_VISIBLE_DEVICES"] for name in "efg"} == {"3"}


def test_a_killed_task_frees_its_device(bench: Bench):
    a, b = bench.task("a", local_gpus="0"), bench.task("b", local_gpus="0")
    bench.start(a)
    runner_pid = bench.seen("a")["pid"]
    bench.start(b)
    wait_until(lambda: "waiting for a GPU" in b.log.text(), what="b to wait")
    a.on_kill()  # what Airflow calls on SIGTERM or a timeout: stops the runner, gives the device back
    result = bench.join("a")
    assert isinstance(result["error"], AirflowException) and "exit code -15" in str(result["error"])
    assert not pid_alive(runner_pid)
    assert bench.seen("b")["CUDA_VISIBLE_DEVICES"] == "0"
    # killed while it waits: it gives up at once and never starts a runner
    c = bench.task("c", local_gpus="0")
    bench.start(c)
    wait_until(lambda: "waiting for a GPU" in c.log.text(), what="c to wait")
    c.on_kill()
    result = bench.join("c")
    assert "killed while it waited for a GPU" in str(result["error"]) and not bench.started("c")
    bench.finish("b")
    assert "manifest" in bench.join("b")
    assert free_slots(DeviceLocks(["0"], 1, bench.locks)) == ["0"]


def test_failures_and_timeouts_free_the_device(bench: Bench):
    locks = DeviceLocks(["0"], 1, bench.locks)
    failing = bench.task("fails", local_gpus="0", env={"FAKE_EXIT": "1", "FAKE_WAIT_FOR": ""})
    with pytest.raises(AirflowException, match="exit code 1"):
        failing.execute({})
    assert free_slots(locks) == ["0"]
    # an execution timeout, as Airflow's task runner applies it (SIGALRM, then on_kill)
    from airflow.sdk.execution_time.timeout import timeout

    slow = bench.task("slow", local_gpus="0")
    with pytest.raises(AirflowTaskTimeout):
        try:
            with timeout(1):
                slow.execute({})
        except AirflowTaskTimeout:
            slow.on_kill()
            raise
    assert not pid_alive(bench.seen("slow")["pid"])
    assert free_slots(locks) == ["0"]
    # and one that times out while waiting for the device
    holder = locks.try_acquire("someone else")
    waiting = bench.task("waits", local_gpus="0")
    with pytest.raises(AirflowTaskTimeout), timeout(1):
        waiting.execute({})
    assert not bench.started("waits") and "waiting for a GPU (all 1 held: by GPU 0: someone else" in (
        waiting.log.text())
    holder.release()
    assert free_slots(locks) == ["0"]


def test_the_runner_inherits_the_lock_and_nothing_else(bench: Bench):
    a = bench.task("a", local_gpus="0")
    bench.start(a)
    fds = bench.seen("a")["fds"]
    assert len(fds) == 5, fds  # stdin, stdout, stderr, the lock, and the listing's own descriptor
    bench.finish("a")
    bench.join("a")


HOLDER = r'''
"""Hold device 0 the way a task does, then report and sleep."""
import sys, time
from airflow_comfy.operators.devices import DeviceLocks

lease = DeviceLocks(["0"], 1, sys.argv[1]).acquire("holder task")
print("held", flush=True)
time.sleep(60)
'''

TASK = r'''
"""A task process: the operator runs the stand-in runner (which waits for its finish file) on device 0."""
import json, sys
from airflow_comfy.operators.local import ComfyGroupLocalOperator

ComfyGroupLocalOperator(task_id="t", **json.loads(sys.argv[1])).execute({})
'''


def test_a_sigkilled_holder_frees_its_device(tmp_path: Path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    locks = DeviceLocks(["0"], 1, tmp_path / "locks")
    holder = subprocess.Popen([sys.executable, str(script), str(locks.lock_dir)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert locks.try_acquire("me") is None and locks.holders()[0].startswith("GPU 0: holder task (pid ")
        holder.send_signal(signal.SIGKILL)  # dies without a word: the kernel drops its lock
        holder.wait(DEADLINE)
        lease = locks.try_acquire("me")
        assert lease is not None and lease.device == "0"
        lease.release()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_sigkilled_task_keeps_the_device_until_its_orphaned_runner_ends(bench: Bench):
    """The runner inherits the lock: if the task process is SIGKILLed (no on_kill), its runner, still on the
    card, keeps the device taken until it exits too."""
    script = bench.root / "task.py"
    script.write_text(TASK)
    kwargs = {"arguments": ["run", "--store", "file:///x", "--run-key", "dag/run1"],
              "runner_command": [sys.executable, str(bench.runner)],
              "env": {"FAKE_NAME": "orphan", "FAKE_RECORD_DIR": str(bench.record),
                      "FAKE_WAIT_FOR": str(bench.root / "finish-orphan")},
              "needs_gpu": True, "local_gpus": "0", "runners_per_gpu": 1, "device_lock_dir": str(bench.locks)}
    task = subprocess.Popen([sys.executable, str(script), json.dumps(kwargs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        runner_pid = bench.seen("orphan")["pid"]
        locks = DeviceLocks(["0"], 1, bench.locks)
        task.send_signal(signal.SIGKILL)
        task.wait(DEADLINE)
        time.sleep(0.2)
        assert pid_alive(runner_pid) and free_slots(locks) == []
        bench.finish("orphan")
        wait_until(lambda: not pid_alive(runner_pid), what="the orphaned runner to end")
        assert free_slots(locks) == ["0"]
    finally:
        task.kill()
        task.wait()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- what is left alone ------------------------------------------------------------------------------------


def test_without_local_gpus_the_devices_are_left_alone(bench: Bench, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    a = bench.task("a", local_gpus="")
    bench.finish("a")
    a.execute({})
    seen = bench.seen("a")
    assert seen["CUDA_VISIBLE_DEVICES"] == "7" and seen["CUDA_DEVICE_ORDER"] is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    b = bench.task("b", local_gpus="")
    bench.finish("b")
    b.execute({})
    assert bench.seen("b")["has_cuda_visible_devices"] is False
    assert not bench.locks.exists()  # no lock taken, not even the folder made
    # auto on a worker without GPUs: the same
    monkeypatch.setenv("PATH", str(bench.root))  # no nvidia-smi
    c = bench.task("c", local_gpus="auto")
    bench.finish("c")
    c.execute({})
    assert bench.seen("c")["has_cuda_visible_devices"] is False and "no GPU found" in c.log.text()


def test_the_worker_setting_is_read_when_the_task_runs(bench: Bench, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW__COMFY__LOCAL_GPUS", "5")
    monkeypatch.setenv("AIRFLOW__COMFY__DEVICE_LOCK_DIR", str(bench.locks))
    a = bench.task("a", local_gpus=None, runners_per_gpu=None)
    bench.finish("a")
    a.execute({})
    assert bench.seen("a")["CUDA_VISIBLE_DEVICES"] == "5"
    assert (bench.locks / "gpu-5.slot0.lock").exists()
    monkeypatch.setenv("AIRFLOW__COMFY__LOCAL_GPUS", "gpu5")
    with pytest.raises(AirflowFailException, match="'gpu5' is not a device"):
        bench.task("b", local_gpus=None).execute({})


def test_groups_without_model_nodes_never_take_a_lock(bench: Bench):
    locks = DeviceLocks(["0"], 1, bench.locks)
    held = locks.try_acquire("a sampler")  # the only device is taken
    images = bench.task("images", local_gpus="0", needs_gpu=False, env={"CUDA_VISIBLE_DEVICES": "0"})
    bench.finish("images")
    images.execute({})  # runs at once
    seen = bench.seen("images")
    # and is kept off the cards: a runner without a model has no business on a GPU another runner holds
    assert seen["has_cuda_visible_devices"] and seen["CUDA_VISIBLE_DEVICES"] == ""
    assert "waiting" not in images.log.text()
    assert locks.holders()[0].startswith("GPU 0: a sampler (pid ")
    held.release()


def test_a_task_env_cannot_move_a_runner_off_its_lock(bench: Bench):
    a = bench.task("a", local_gpus="1", env={"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    bench.finish("a")
    a.execute({})
    seen = bench.seen("a")
    assert seen["CUDA_VISIBLE_DEVICES"] == "1" and seen["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert "the runner gets GPU 1 (its lock) instead" in a.log.text()


def test_build_group_task_computes_needs_gpu(tmp_path: Path):
    settings = get_settings(artifact_store=f"file://{tmp_path}/store", backend="local")
    for group, needs in ((SAMPLE, True), (IMAGES, False)):
        task = build_group_task(group, task_config=GroupTaskConfig(), settings=settings, upstream_task_ids=[])
        assert task.needs_gpu is needs
        assert task.local_gpus is None  # the worker's setting, read when the task runs


def test_the_device_module_imports_neither_airflow_nor_torch():
    code = textwrap.dedent("""
        import sys
        import airflow_comfy.operators.devices
        print(sorted(m for m in ("airflow", "torch") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == "[]"


def test_an_unusable_lock_folder_fails_the_try(bench: Bench):
    (bench.root / "a-file").write_text("")
    task = bench.task("a", local_gpus="0")
    task.device_lock_dir = str(bench.root / "a-file" / "locks")
    with pytest.raises(AirflowException, match=r"could not use the GPU lock folder .*\[comfy\] device_lock_dir"):
        task.execute({})
    assert not bench.started("a")
