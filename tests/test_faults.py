"""The fault suite: real runner processes killed, stores that stall, vanish, cut connections or refuse, and what a
retry makes of it. Each case is bounded in time; a table of cases and outcomes is printed at the end of the run
(``conftest.pytest_terminal_summary``).

* SIGKILL at four points of a group (``AIRFLOW_COMFY_RUNNER_CRASH_AT``: the runner kills itself, as the OOM
  killer would) and at a random moment (from outside), each followed by the next try: the outputs equal a clean
  run's, nothing is duplicated, no temporary file is left.
* An S3-protocol server (moto, in a process of its own) paused (SIGSTOP) while the group writes, then killed;
  a TCP proxy in front of it that cuts an upload midway, stalls an answer past the read timeout and slows
  everything down.
* A full, a read-only and a missing output folder (tmpfs mounts; skipped where mounting is not permitted).
* Two ``airflow-comfy run`` started in the same second; a run id reused with other params.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fault_table import record
from s3_server import MotoProcess, moto_s3_process

from airflow_comfy.artifacts.specs import publish_spec
from airflow_comfy.artifacts.store import TMP_PREFIX, open_store
from airflow_comfy.local_run import compile_for_run
from airflow_comfy.log_lines import parse_line
from airflow_comfy.operators.command import local_arguments, runner_arguments, runner_prefix
from airflow_comfy.runner.faults import ENV as CRASH_AT
from airflow_comfy.workflow.groupspec import GroupSpec

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "example_workflows" / "txt2img.json"
THREADS = ["--threads", "1"]
KILLED = -signal.SIGKILL
PROCESS_TIMEOUT = 180
# Tight store bounds, so that the cases end in seconds: (a PUT first waits up to 1 s for "100 Continue")
LIMITS = "connect=1,read=2,operation=6,attempts=3"
OPERATION_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def compiled():
    compiled = compile_for_run(WORKFLOW)
    assert [group["task_id"] for group in compiled.groups] == ["inference", "postprocess"]
    return compiled


@pytest.fixture(scope="module")
def specs(compiled) -> dict[str, GroupSpec]:
    return {group["task_id"]: GroupSpec.from_dict(group["spec"]) for group in compiled.groups}


# --- running one group as a real runner process ----------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float
    manifest: dict | None

    @property
    def last_line(self) -> str:
        """The output's last line, without the runner's level word."""
        return parse_line(self.output.strip().splitlines()[-1])[1] if self.output.strip() else ""


@dataclass
class GroupRunner:
    models: Path
    inputs: Path
    scratch: Path
    spec_store: str | None = None
    """Where specs are published (default: the run's store)."""
    env: dict[str, str] = field(default_factory=dict)

    def run(self, spec: GroupSpec, *, store: str, run_key: str, try_number: int, inputs: list[str] | None = None,
            env: dict[str, str] | None = None, params: str = "{}",
            on_line: Callable[[str, subprocess.Popen], None] | None = None) -> Outcome:
        argv = runner_arguments(spec, store=store, models_path=str(self.models), input_path=str(self.inputs),
                                run_key=run_key, try_number=str(try_number), params=params,
                                input_uris=inputs or [])
        argv[argv.index("--spec") + 1] = publish_spec(open_store(self.spec_store or store), spec.to_bytes(),
                                                      spec.sha256())
        manifest_out = self.scratch / f"manifest-{uuid.uuid4().hex[:8]}.json"
        command = runner_prefix(sys.executable) + local_arguments(argv, str(manifest_out)) + THREADS
        began = time.monotonic()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **self.env, **(env or {})})
        timer = threading.Timer(PROCESS_TIMEOUT, process.kill)
        timer.start()
        lines = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if on_line:
                    on_line(line, process)
            returncode = process.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - began
        assert seconds < PROCESS_TIMEOUT, "".join(lines)[-3000:]
        manifest = json.loads(manifest_out.read_text()) if manifest_out.exists() else None
        return Outcome(returncode, "".join(lines), seconds, manifest)


@pytest.fixture
def runner(demo_models: Path, demo_inputs: Path, tmp_path: Path) -> GroupRunner:
    return GroupRunner(demo_models, demo_inputs, tmp_path)


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- two runs in the same second: the reference output -------------------------------------------------------


@pytest.fixture(scope="module")
def reference(demo_models: Path, demo_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two ``airflow-comfy run --single-group`` started together into one output folder: two runs, two run keys,
    the same image in each. Returns that image's sha256 (what every case below must end with)."""
    output = tmp_path_factory.mktemp("same-second")
    command = [sys.executable, "-m", "airflow_comfy.cli", "run", str(WORKFLOW), "--models", str(demo_models),
               "--output", str(output), "--input-dir", str(demo_inputs), "--single-group"]
    began = time.monotonic()
    env = {**os.environ, "COMFY_RUNNER_THREADS": "1"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(2)]
    results = [process.communicate(timeout=PROCESS_TIMEOUT) for process in processes]
    seconds = time.monotonic() - began
    for process, (out, _) in zip(processes, results, strict=True):
        assert process.returncode == 0, out[-3000:]
    images = sorted((output / "runs" / "txt2img").glob("*/outputs/*.png"))
    assert [image.name for image in images] == ["txt2img_00001_.png"] * 2, images
    assert images[0].parent.parent != images[1].parent.parent  # two run keys
    assert sha256(images[0]) == sha256(images[1])
    assert not [p for p in output.rglob(f"{TMP_PREFIX}*")]
    runs = ", ".join(image.parent.parent.name for image in images)
    record("two `airflow-comfy run` in the same second", "same start time", f"exit 0 twice; run ids {runs}",
           seconds)
    return sha256(images[0])


# --- SIGKILL and retry ----------------------------------------------------------------------------------------


def test_killed_groups_retry_to_the_same_outputs(runner: GroupRunner, specs: dict[str, GroupSpec], tmp_path: Path,
                                                 reference: str):
    root = tmp_path / "store"
    store, run_key = root.as_uri(), "txt2img/kills"
    run_dir = root / "runs" / "txt2img" / "kills"

    def step(group: str, try_number: int, crash: str | None, inputs: list[str] | None = None) -> Outcome:
        outcome = runner.run(specs[group], store=store, run_key=run_key, try_number=try_number, inputs=inputs,
                             env={CRASH_AT: crash} if crash else {})
        assert outcome.returncode == (KILLED if crash else 0), outcome.output[-3000:]
        return outcome

    killed = step("inference", 1, "start")
    assert files_under(run_dir) == []  # the probe came and went; nothing computed
    record("local: inference try 1", "SIGKILL at start", "killed; nothing left", killed.seconds)
    killed = step("inference", 2, "intermediate")
    assert files_under(run_dir) == ["inference/try-2/5/0.safetensors"]  # uncommitted: no manifest
    half = run_dir / "inference" / "try-2" / "5" / f"{TMP_PREFIX}half.tmp"  # what a kill mid-write leaves
    half.write_bytes(b"half a latent")
    record("local: inference try 2", "SIGKILL after the latent", "killed; latent without manifest", killed.seconds)
    done = step("inference", 3, None)
    assert done.manifest is not None and done.manifest["try"] == 3
    assert files_under(run_dir) == ["inference/try-3/5/0.safetensors", "inference/try-3/manifest.json"]
    record("local: inference try 3", "retry", "exit 0; try 2's latent and temp file removed", done.seconds)
    upstream = [done.manifest["manifest_uri"]]

    killed = step("postprocess", 1, "image", upstream)
    assert "outputs/txt2img_00001_.png" in files_under(run_dir)
    assert not (run_dir / "postprocess" / "try-1" / "manifest.json").exists()
    record("local: postprocess try 1", "SIGKILL after the image", "killed; image without manifest", killed.seconds)
    killed = step("postprocess", 2, "manifest", upstream)
    assert (run_dir / "postprocess" / "try-2" / "manifest.json").exists()
    assert [name for name in files_under(run_dir / "outputs")] == ["snapshot.postprocess.json",
                                                                   "txt2img_00001_.png"]
    record("local: postprocess try 2", "SIGKILL after the manifest", "killed; same name 00001 reused",
           killed.seconds)
    done = step("postprocess", 3, None, upstream)
    assert done.manifest is not None and done.manifest["try"] == 2  # the committed try's manifest, not recomputed
    assert "computing nothing" in done.output
    record("local: postprocess try 3", "retry after commit", "exit 0; try 2's manifest returned, nothing computed",
           done.seconds)

    assert files_under(run_dir) == [
        "inference/try-3/5/0.safetensors", "inference/try-3/manifest.json",
        "outputs/snapshot.postprocess.json", "outputs/txt2img_00001_.png",
        "postprocess/try-2/manifest.json",
    ]
    assert sha256(run_dir / "outputs" / "txt2img_00001_.png") == reference
    assert not list(root.rglob(f"{TMP_PREFIX}*"))


def test_killed_at_a_random_moment_then_retried(runner: GroupRunner, specs: dict[str, GroupSpec], tmp_path: Path,
                                                reference: str):
    """A SIGKILL from outside while the group computes (its image node running), then the next try."""
    root = tmp_path / "store"
    store, run_key = root.as_uri(), "txt2img/random-kill"
    run_dir = root / "runs" / "txt2img" / "random-kill"
    compiled = compile_for_run(WORKFLOW, single_group=True)
    spec = GroupSpec.from_dict(compiled.groups[0]["spec"])
    def kill_when_decoding(line: str, process: subprocess.Popen) -> None:
        if "(VAEDecode): start" in line:
            process.send_signal(signal.SIGKILL)

    killed = runner.run(spec, store=store, run_key=run_key, try_number=1, on_line=kill_when_decoding)
    assert killed.returncode == KILLED, killed.output[-3000:]
    done = runner.run(spec, store=store, run_key=run_key, try_number=2)
    assert done.returncode == 0, done.output[-3000:]
    assert files_under(run_dir) == ["main/try-2/manifest.json", "outputs/snapshot.main.json",
                                    "outputs/txt2img_00001_.png"]
    assert sha256(run_dir / "outputs" / "txt2img_00001_.png") == reference
    record("local: whole workflow", "SIGKILL from outside while decoding", "retry exit 0; same image, 1 copy",
           killed.seconds + done.seconds)


def test_a_run_id_reused_with_other_params_is_refused_at_once(demo_models: Path, demo_inputs: Path,
                                                              tmp_path: Path):
    """Same run id: same params return what was committed (nothing computed); other params exit 2 before any model
    is loaded, saying what is there."""
    base = [sys.executable, "-m", "airflow_comfy.cli", "run", str(WORKFLOW), "--models", str(demo_models),
            "--output", str(tmp_path), "--input-dir", str(demo_inputs), "--run-id", "again", "--single-group"]
    env = {**os.environ, "COMFY_RUNNER_THREADS": "1"}
    first = subprocess.run(base, capture_output=True, text=True, env=env, timeout=PROCESS_TIMEOUT)
    assert first.returncode == 0, first.stderr[-3000:]
    began = time.monotonic()
    same = subprocess.run(base, capture_output=True, text=True, env=env, timeout=PROCESS_TIMEOUT)
    same_seconds = time.monotonic() - began
    assert same.returncode == 0 and same.stdout == first.stdout, same.stderr[-3000:]
    began = time.monotonic()
    other = subprocess.run(base + ["--param", "seed=7"], capture_output=True, text=True, env=env,
                           timeout=PROCESS_TIMEOUT)
    other_seconds = time.monotonic() - began
    assert other.returncode == 2, other.stderr[-3000:]
    error = other.stderr.strip().splitlines()[-2]
    assert error.startswith("error: group 'main': run key 'txt2img/again' is taken: group 'main' was committed "
                            "there by try 1 with other params (seed=42 there; seed=7 here)"), error
    assert "Traceback" not in other.stderr
    assert len(list(tmp_path.glob("runs/txt2img/again/outputs/*.png"))) == 1
    record("`airflow-comfy run --run-id` reused", "same params", "exit 0; committed outputs, nothing computed",
           same_seconds)
    record("`airflow-comfy run --run-id` reused", "other params", "exit 2 at preflight: 'run key ... is taken'",
           other_seconds)


def test_runner_deadline(runner: GroupRunner, specs: dict[str, GroupSpec], tmp_path: Path):
    outcome = runner.run(specs["inference"], store=(tmp_path / "store").as_uri(), run_key="txt2img/deadline",
                         try_number=1, env={"COMFY_RUNNER_DEADLINE_S": "3"})
    assert outcome.returncode == 1, outcome.output[-3000:]
    assert outcome.last_line.startswith("airflow-comfy runner: failed: the runner passed its deadline of 3 s")
    assert outcome.seconds < 3 + 5  # the interpreter's start, then 3 s
    record("runner deadline 3 s", "a group slower than that", "exit 1 (retried): 'passed its deadline of 3 s'",
           outcome.seconds)


# --- full, read-only and missing output folders ---------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs -o {options}: {mounted.stderr.strip()}); the full "
                    "and read-only folder cases need one (root, or CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize(("case", "expected_code", "expected"), [
    ("full", 1, "No space left on device"),
    ("read-only", 2, "Read-only file system"),
    ("missing", 2, "Not a directory"),
])
def test_unusable_output_folders_fail_before_any_model_loads(runner: GroupRunner, specs: dict[str, GroupSpec],
                                                             tmp_path: Path, case: str, expected_code: int,
                                                             expected: str):
    runner.spec_store = (tmp_path / "specs").as_uri()
    folder = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        if case == "full":
            stack.enter_context(tmpfs(folder, "size=1m"))
            with contextlib.suppress(OSError), open(folder / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 65536)
        elif case == "read-only":
            stack.enter_context(tmpfs(folder, "ro,size=1m"))
        else:
            folder.write_bytes(b"a file where the store's folder should be")
            folder = folder / "store"
        outcome = runner.run(specs["inference"], store=folder.as_uri(), run_key="txt2img/unusable", try_number=1)
    assert outcome.returncode == expected_code, outcome.output[-3000:]
    kind = "failed" if expected_code == 1 else "bad input"
    assert outcome.last_line.startswith(f"airflow-comfy runner: {kind}: the artifact store {folder.as_uri()} "
                                        "cannot be written"), outcome.last_line
    assert expected in outcome.last_line and "Traceback" not in outcome.output
    assert "node " not in outcome.output  # no node ran, no model was loaded
    record(f"{case} output folder", {"full": "tmpfs 1 MiB, filled", "read-only": "tmpfs mounted ro",
                                     "missing": "a file in the way"}[case],
           f"exit {expected_code} at preflight: '{expected}'", outcome.seconds)


# --- S3: a server paused, killed; a proxy that cuts, stalls and slows ---------------------------------------------


class FaultProxy:
    """A TCP proxy in front of an S3 server. It passes bytes through, reads the request lines going by, and can:
    call ``on_request`` for each; cut the connection midway through the body of the first request matching a
    pattern; hold the answer to the first request matching another for some seconds; slow every answer."""

    _REQUEST = re.compile(rb"(GET|PUT|HEAD|DELETE|POST) (\S+) HTTP/1\.1\r\n")

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: list[str] = []
        self.on_request: Callable[[str], None] | None = None
        self.cut: str | None = None
        self.stall: tuple[str, float] | None = None
        self.delay = 0.0
        self.events: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            state = {"cut_budget": None, "stall": 0.0}
            threading.Thread(target=self._upward, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._downward, args=(upstream, client, state), daemon=True).start()

    def _upward(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                for match in self._REQUEST.finditer(data):
                    line = f"{match.group(1).decode()} {match.group(2).decode()}"
                    self.seen.append(line)
                    if self.on_request:
                        self.on_request(line)
                    if self.cut and re.search(self.cut, line):
                        self.cut, state["cut_budget"] = None, len(data) + 100  # the headers and 100 bytes more
                        self.events.append(f"cut {line}")
                    if self.stall and re.search(self.stall[0], line):
                        state["stall"], self.stall = self.stall[1], None
                        self.events.append(f"stalled the answer to {line}")
                if state["cut_budget"] is not None:
                    upstream.sendall(data[:state["cut_budget"]])
                    state["cut_budget"] -= len(data)
                    if state["cut_budget"] <= 0:
                        break
                    continue
                upstream.sendall(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _downward(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["stall"]:
                    time.sleep(state["stall"])
                    state["stall"] = 0.0
                if self.delay:
                    time.sleep(self.delay)
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAULTS000001", "AWS_SECRET_ACCESS_KEY": "fake-faults-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[MotoProcess, FaultProxy]]:
    """moto in a process of its own, a proxy in front of it, and the environment (inherited by runners and by
    the operator's subprocess) pointing at the proxy with fake credentials and the suite's tight store bounds."""
    with moto_s3_process() as server, pytest.MonkeyPatch.context() as env:
        proxy = FaultProxy(server.endpoint)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                     "AWS_WEB_IDENTITY_TOKEN_FILE"):
            env.delenv(name, raising=False)
        for name, value in AWS_ENV.items():
            env.setenv(name, value)
        env.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        env.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        env.setenv("COMFY_STORE_TIMEOUTS", LIMITS)
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="faults")
        try:
            yield server, proxy
        finally:
            proxy.close()


def bucket_keys(server: MotoProcess, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="faults", Prefix=prefix)
    return sorted(item["Key"][len(prefix):] for page in pages for item in page.get("Contents", []))


def test_paused_s3_server_fails_the_task_in_time_and_the_retry_cleans_up(
        s3: tuple[MotoProcess, FaultProxy], specs: dict[str, GroupSpec], demo_models: Path, demo_inputs: Path):
    """The task (the local operator, with [comfy] store_* settings) fails with a retryable error within the store's
    operation timeout of the moment the server stopped; once it is back, the next try succeeds and removes what
    the failed one left."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    server, proxy = s3
    paused: list[float] = []

    def pause_at_the_latent(line: str) -> None:
        if line.startswith("PUT ") and line.endswith("/5/0.safetensors") and not paused:
            server.pause()
            paused.append(time.monotonic())

    proxy.on_request = pause_at_the_latent
    task = _operator(specs["inference"], demo_models, demo_inputs, try_number=1)
    began = time.monotonic()
    with pytest.raises(AirflowException) as failed:
        task.execute(context={})
    ended = time.monotonic()
    server.resume()
    assert paused, "the group never wrote its latent"
    bound = ended - paused[0]
    message = str(failed.value)
    assert not isinstance(failed.value, AirflowFailException)  # retryable
    first = message.splitlines()[0]
    assert re.match(r"cannot write s3://faults/comfy/runs/txt2img/paused/inference/try-1/5/0\.safetensors: "
                    r"(no answer within 6 s|gave up after \d attempt\(s\))", first), message
    assert "Traceback" not in message and len(message.splitlines()) == 2
    assert bound <= OPERATION_TIMEOUT + 1.5, bound
    record("S3 paused (SIGSTOP) at the latent's PUT", f"store bounds {LIMITS}",
           f"task failed, retryable, {bound:.1f} s after the pause", ended - began)

    proxy.on_request = None
    task = _operator(specs["inference"], demo_models, demo_inputs, try_number=2)
    began = time.monotonic()
    manifest = task.execute(context={})
    assert manifest["try"] == 2
    assert bucket_keys(server, "comfy/runs/txt2img/paused/") == ["inference/try-2/5/0.safetensors",
                                                                "inference/try-2/manifest.json"]
    record("S3 resumed: the next try", "retry", "exit 0; try 1's leftovers removed", time.monotonic() - began)


def _operator(spec: GroupSpec, models: Path, inputs: Path, *, try_number: int):
    from airflow_comfy.config import get_settings
    from airflow_comfy.operators.build import build_group_task
    from airflow_comfy.operators.command import PARAMS_TEMPLATE, RUN_KEY_TEMPLATE, TRY_TEMPLATE
    from airflow_comfy.operators.task_config import GroupTaskConfig

    settings = get_settings(artifact_store="s3://faults/comfy", models_path=str(models), input_path=str(inputs),
                            runner_python="", local_gpus="", store_connect_timeout=1.0, store_read_timeout=2.0,
                            store_operation_timeout=OPERATION_TIMEOUT, store_attempts=3)
    task = build_group_task(spec, task_config=GroupTaskConfig(env={"COMFY_RUNNER_THREADS": "1"}),
                            settings=settings, upstream_task_ids=[])
    rendered = {RUN_KEY_TEMPLATE: "txt2img/paused", TRY_TEMPLATE: str(try_number), PARAMS_TEMPLATE: "{}"}
    task.arguments = [rendered.get(arg, arg) for arg in task.arguments]
    assert task.env["COMFY_STORE_TIMEOUTS"] == LIMITS  # from the [comfy] store_* settings
    return task


def test_killed_s3_server_fails_the_group_in_time(s3: tuple[MotoProcess, FaultProxy], runner: GroupRunner,
                                                  specs: dict[str, GroupSpec]):
    server, proxy = s3
    killed: list[float] = []

    def kill_at_the_probe(line: str) -> None:
        if line.startswith("PUT ") and line.endswith("/write-probe") and not killed:
            server.kill()
            killed.append(time.monotonic())

    proxy.on_request = kill_at_the_probe
    runner.spec_store = None
    outcome = runner.run(specs["inference"], store="s3://faults/comfy", run_key="txt2img/killed", try_number=1)
    assert killed and outcome.returncode == 1, outcome.output[-3000:]
    assert outcome.last_line.startswith("airflow-comfy runner: failed: the artifact store s3://faults/comfy cannot "
                                        "be written now (cannot write s3://faults/comfy/runs/txt2img/killed/"
                                        "inference/try-1/write-probe: "), outcome.last_line
    assert "Traceback" not in outcome.output and "node " not in outcome.output
    record("S3 killed at the preflight probe", f"store bounds {LIMITS}", "exit 1 (retried) before any model loads",
           outcome.seconds)


def test_cut_stalled_and_slow_s3_connections_are_retried_without_orphans(
        s3: tuple[MotoProcess, FaultProxy], runner: GroupRunner, reference: str):
    """The image's upload is cut midway, the manifest's answer is held past the read timeout (the PUT did
    land), every answer is slowed: the group retries each operation and ends as a clean run would."""
    import boto3

    server, proxy = s3
    proxy.cut = r"^PUT .*/saved/txt2img_00001_\.png$"
    proxy.stall = (r"^PUT .*/main/try-1/manifest\.json$", 3.0)
    proxy.delay = 0.02
    spec = GroupSpec.from_dict(compile_for_run(WORKFLOW, single_group=True).groups[0]["spec"])
    outcome = runner.run(spec, store="s3://faults/comfy", run_key="txt2img/cut", try_number=1)
    assert outcome.returncode == 0, outcome.output[-3000:]
    assert proxy.events == ["cut PUT /faults/comfy/runs/txt2img/cut/main/try-1/7/saved/txt2img_00001_.png",
                            "stalled the answer to PUT /faults/comfy/runs/txt2img/cut/main/try-1/manifest.json"]
    assert proxy.seen.count("PUT /faults/comfy/runs/txt2img/cut/main/try-1/7/saved/txt2img_00001_.png") == 2
    assert bucket_keys(server, "comfy/runs/txt2img/cut/") == ["main/try-1/manifest.json",
                                                             "outputs/snapshot.main.json",
                                                             "outputs/txt2img_00001_.png"]
    client = boto3.client("s3", endpoint_url=server.endpoint)
    png = client.get_object(Bucket="faults", Key="comfy/runs/txt2img/cut/outputs/txt2img_00001_.png")["Body"].read()
    assert hashlib.sha256(png).hexdigest() == reference
    assert outcome.manifest is not None and outcome.manifest["try"] == 1
    record("S3 via a faulty proxy", "upload cut; answer held 3 s; +20 ms per answer",
           "exit 0; each retried; no orphan; same image", outcome.seconds)
