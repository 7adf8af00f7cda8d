"""Run one group on the worker itself: the very command a group pod runs, as a subprocess or as a job of the
worker's warm runner service (:mod:`airflow_comfy.runner.service`)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_comfy.metrics import emit_group_metrics, task_tags
from airflow_comfy.operators.command import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    MANIFEST_URI_KEY,
    local_arguments,
    runner_prefix,
)
from airflow_comfy.operators.devices import (
    DeviceLease,
    DeviceLocks,
    DeviceWaitInterrupted,
    group_needs_gpu,
    resolve_gpus,
)
from airflow_comfy.operators.failure_text import runner_failure
from airflow_comfy.operators.links import GROUP_TASK_LINKS, MANIFEST_ATTRIBUTE
from airflow_comfy.operators.preemption_log import STOPPED_MESSAGE, log_preemptions
from airflow_comfy.operators.runner_log import describe_run, relay_line
from airflow_comfy.operators.spec_publish import publish_group_spec
from airflow_comfy.runner_service.client import (
    JobResult,
    ServiceConfig,
    ServiceDied,
    ServiceSession,
    ServiceUnavailable,
    slot_name,
)
from airflow_comfy.workflow.groupspec import GroupSpec

#: How many of the runner's last output lines are searched for its failure line (operators.failure_text).
ERROR_TAIL_LINES = 20
#: Seconds a killed runner gets to exit after SIGTERM before it is SIGKILLed.
KILL_GRACE_SECONDS = 10.0


class ComfyGroupLocalOperator(BaseOperator):
    """Run the runner command (see :mod:`airflow_comfy.operators.command`) as a subprocess of the task.

    :param arguments: the runner's arguments (templated), as built by ``runner_arguments``; ``--manifest-out``
        is added at run time.
    :param runner_python: interpreter for ``python -m airflow_comfy.runner``; default: the worker's own.
    :param runner_command: replaces the whole ``[python, -m, airflow_comfy.runner]`` prefix (tests use it to
        run a fake runner).
    :param env: extra environment variables of the runner (templated); ``HF_HUB_OFFLINE=1`` is always set.
    :param aws_conn_id: an Airflow connection whose credentials the runner gets as ``AWS_*`` environment
        variables (see :func:`aws_env_from_connection`), read when the task runs and never stored on the
        operator, written to its arguments, the log or XCom. None: the worker's own AWS environment.
    :param group_spec: the GroupSpec the arguments name by ``--spec``/``--spec-sha256``; written to ``store``
        at that content address before the runner starts (:mod:`airflow_comfy.operators.spec_publish`).
    :param spec_sha256: its sha256, as computed at parse time.
    :param store: the artifact store URI (the runner's ``--store``).
    :param needs_gpu: whether the group takes a GPU when the worker's GPUs are managed (``[comfy] local_gpus``);
        None: :func:`~airflow_comfy.operators.devices.group_needs_gpu` of ``group_spec`` (False without one).
    :param local_gpus: ``[comfy] local_gpus`` (empty: no device management; ``auto``; ``0,1,3``);
        None: the worker's setting, read when the task runs.
    :param runners_per_gpu: ``[comfy] runners_per_gpu``; None: the worker's setting.
    :param device_lock_dir: ``[comfy] device_lock_dir``; None: the worker's setting.
    :param runner_service: ``[comfy] runner_service``: run the command as a job of the warm runner service;
        None: the worker's setting. Never with ``runner_command``.
    :param runner_service_dir: ``[comfy] runner_service_dir``; None: the worker's setting.
    :param runner_service_socket: ``[comfy] runner_service_socket``: the socket of a runner service that runs
        elsewhere (another container), which this task only connects to; "": none; None: the worker's setting.

    With managed GPUs, a group that needs one waits for a free device slot (a lock file in
    ``device_lock_dir``, held by this task's process and inherited by its runner), runs its runner with
    ``CUDA_VISIBLE_DEVICES`` set to that device, and gives the slot back when the runner has exited, whatever
    the outcome (success, failure, timeout, kill). A group that needs none gets ``CUDA_VISIBLE_DEVICES=""``.

    With the runner service on, the same arguments, environment and working folder go to the worker's runner
    service for this device slot (started on demand), which runs them with its models already loaded; the
    device lock goes with them and is held by the service until the job ends. Its log lines come back as
    they are written, and the job's exit code counts as the subprocess's would. A service that cannot be used
    (not startable, busy, unreachable, refusing) means a subprocess instead; one that dies during the job fails
    the try (retried). A killed task cancels its job: it stops at the next node or sampler step.

    With ``runner_service_socket``, the service runs in another container: the task waits for its turn, sends
    the job with its own variables only (``AWS_*``, ``COMFY_*``, ``env``; the service keeps its interpreter,
    folders and process variables), has the manifest written to a folder beside the socket (the one folder both
    sides see), and never runs a subprocess: no service there fails the try (retried), naming the socket.

    Returns the manifest the runner wrote (pushed as XCom ``return_value``). Exit code 2 (bad input) raises
    ``AirflowFailException`` (no retry); any other failure raises ``AirflowException`` (retried).
    """

    template_fields: Sequence[str] = ("arguments", "env")
    template_fields_renderers = {"arguments": "py", "env": "json"}
    ui_color = "#e8f4fd"
    operator_extra_links = GROUP_TASK_LINKS
    #: Seconds between two tries for a device slot while every slot is held.
    device_poll_seconds: float = 1.0
    #: Seconds a cancelled job of the runner service has to stop before the service is ended.
    service_cancel_grace: float = 5.0

    def __init__(
        self,
        *,
        arguments: list[str],
        runner_python: str | None = None,
        runner_command: list[str] | None = None,
        env: dict[str, str] | None = None,
        aws_conn_id: str | None = None,
        group_spec: GroupSpec | None = None,
        spec_sha256: str | None = None,
        store: str | None = None,
        needs_gpu: bool | None = None,
        local_gpus: str | None = None,
        runners_per_gpu: int | None = None,
        device_lock_dir: str | None = None,
        runner_service: bool | None = None,
        runner_service_dir: str | None = None,
        runner_service_socket: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.group_spec = group_spec
        self.spec_sha256 = spec_sha256
        self.store = store
        self.arguments = list(arguments)
        self.runner_python = runner_python
        self.runner_command = list(runner_command) if runner_command else None
        self.env = dict(env or {})
        self.aws_conn_id = aws_conn_id or None
        if needs_gpu is None:
            needs_gpu = group_spec is not None and group_needs_gpu(group_spec)
        self.needs_gpu = bool(needs_gpu)
        self.local_gpus = local_gpus
        self.runners_per_gpu = runners_per_gpu
        self.device_lock_dir = device_lock_dir
        self.runner_service = runner_service
        self.runner_service_dir = runner_service_dir
        self.runner_service_socket = runner_service_socket
        self._process: subprocess.Popen[str] | None = None
        self._session: ServiceSession | None = None
        self._lease: DeviceLease | None = None
        self._killed = False

    def command(self, manifest_out: str) -> list[str]:
        prefix = self.runner_command or runner_prefix(self.runner_python or sys.executable)
        return [*prefix, *local_arguments(self.arguments, manifest_out)]

    def subprocess_env(self, credentials: dict[str, str] | None = None) -> dict[str, str]:
        """The runner's environment. ``credentials`` (the ``AWS_*`` variables from ``aws_conn_id``) replace the
        worker's own AWS identity (keys, token, profile), so that the two are never mixed; the task's ``env``
        still wins over both."""
        base = dict(os.environ)
        if credentials is not None:
            for name in AWS_IDENTITY_ENV:
                base.pop(name, None)
        return {**base, **(credentials or {}), **self.env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def forwarded_env(self, credentials: dict[str, str] | None = None) -> dict[str, str]:
        """The variables a runner service elsewhere gets with the job, on top of its own environment: the
        worker's store and runner settings (:data:`FORWARDED_ENV_PREFIXES`; its AWS identity only when
        ``credentials`` do not replace it), ``credentials`` and the task's ``env``. Never the rest of the
        worker's environment (Airflow's own secrets, its interpreter's and folders' variables)."""
        ambient = {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENV_PREFIXES)}
        if credentials is not None:
            for name in AWS_IDENTITY_ENV:
                ambient.pop(name, None)
        return {**ambient, **(credentials or {}), **self.env}

    def execute(self, context: Any) -> dict[str, Any]:
        self._killed = False
        log_preemptions(context, self.log)
        credentials = aws_env_from_connection(self.aws_conn_id) if self.aws_conn_id else None
        if self.group_spec is not None and self.spec_sha256 and self.store:
            publish_group_spec(self.group_spec, self.spec_sha256, self.store, aws_env=credentials, log=self.log)
        service = self._service_config()
        try:
            device_env = self._take_device(context)
            with manifest_folder(service) as tmp:
                manifest_out = os.path.join(tmp, "manifest.json")
                if service is not None and service.external:
                    env = {**self.forwarded_env(credentials), **device_env}
                else:
                    env = {**self.subprocess_env(credentials), **device_env}
                command = self.command(manifest_out)
                warm = self._run_in_service(service, command, local_arguments(self.arguments, manifest_out), env)
                returncode, tail = warm if warm is not None else self._run(command, env)
                raise_for_exit(returncode, tail)
                manifest = read_manifest(manifest_out)
        finally:
            self._release_device()
        self.log.info("Runner manifest: %s", manifest.get(MANIFEST_URI_KEY))
        setattr(self, MANIFEST_ATTRIBUTE, manifest)  # for the extra links, made when the task finishes
        emit_group_metrics(manifest, task_tags(context, self), self.log)
        return manifest

    # --- the GPU ---------------------------------------------------------------------------------------------

    def _device_settings(self) -> tuple[str, int, str]:
        """``local_gpus``, ``runners_per_gpu`` and ``device_lock_dir``: the operator's, else the worker's."""
        local_gpus, runners, lock_dir = self.local_gpus, self.runners_per_gpu, self.device_lock_dir
        if local_gpus is None or runners is None or lock_dir is None:
            from airflow_comfy.config import get_settings

            try:
                current = get_settings()
            except ValueError as exc:
                raise AirflowFailException(f"the [comfy] settings are invalid: {exc}") from None
            local_gpus = current.local_gpus if local_gpus is None else local_gpus
            runners = current.runners_per_gpu if runners is None else runners
            lock_dir = current.device_lock_dir if lock_dir is None else lock_dir
        return local_gpus, runners, lock_dir

    def _take_device(self, context: Any) -> dict[str, str]:
        """The runner's device variables, after taking a device slot when this group needs one (see the class
        docstring). Nothing when the worker's GPUs are not managed."""
        local_gpus, runners, lock_dir = self._device_settings()
        if not local_gpus.strip():
            return {}
        if not self.needs_gpu:
            self.log.info("No model node in this group: its runner takes no GPU (CUDA_VISIBLE_DEVICES='')")
            return {"CUDA_VISIBLE_DEVICES": ""}
        try:
            devices, source = resolve_gpus(local_gpus)
            locks = DeviceLocks(devices, runners, lock_dir) if devices else None
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        if locks is None:
            self.log.info("[comfy] local_gpus %r: no GPU found (%s); the runner's devices are left as they are",
                          local_gpus, source)
            return {}
        try:
            self._lease = locks.acquire(task_holder(context, self.task_id), poll_seconds=self.device_poll_seconds,
                                        should_stop=lambda: self._killed, log=self.log.info)
        except DeviceWaitInterrupted:
            raise AirflowException("The task was killed while it waited for a GPU") from None
        except OSError as exc:
            raise AirflowException(f"could not use the GPU lock folder {lock_dir} ([comfy] device_lock_dir): "
                                   f"{exc}") from exc
        if self._killed:  # killed after the wait's last look at the flag
            raise AirflowException("The task was killed while it took a GPU")
        lease = self._lease
        self.log.info("GPU %s for this runner (slot %d of %d; devices %s from %s; lock %s)", lease.device,
                      lease.slot + 1, runners, ",".join(devices), source, lease.path)
        env = {"CUDA_VISIBLE_DEVICES": lease.device}
        if "CUDA_DEVICE_ORDER" not in os.environ and "CUDA_DEVICE_ORDER" not in self.env:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as nvidia-smi numbers them
        overridden = self.env.get("CUDA_VISIBLE_DEVICES")
        if overridden is not None and overridden != lease.device:
            self.log.warning("The task's env sets CUDA_VISIBLE_DEVICES=%r; the runner gets GPU %s (its lock) "
                             "instead", overridden, lease.device)
        return env

    def _release_device(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and lease.held:
            lease.release()
            self.log.info("Released GPU %s", lease.device)

    # --- the runner ------------------------------------------------------------------------------------------

    def _run(self, command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
        """Run ``command``, streaming its output (stdout and stderr) line by line into the task log. A held
        device lock is inherited by the runner, so that the device stays taken while the runner lives, even
        if this process dies first."""
        self.log.info("Running: %s", describe_run(command, self._group_name()))
        tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
        lease = self._lease
        try:
            if self._killed:
                raise AirflowException("The task was killed before its runner started")
            self._process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
                errors="backslashreplace",
                bufsize=1,
                pass_fds=(lease.fd,) if lease is not None and lease.fd is not None else (),
            )
        except OSError as exc:
            raise AirflowException(f"could not start the runner {command[0]!r}: {exc}") from exc
        try:
            assert self._process.stdout is not None
            for raw in self._process.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                relay_line(self.log, line)
            returncode = self._process.wait()
        finally:
            self._stop_process()  # still running only if we were interrupted (timeout, kill)
        return returncode, list(tail)

    # --- the runner service ------------------------------------------------------------------------------------

    def _service_config(self) -> ServiceConfig | None:
        """How to reach the runner service; None when this task does not use one."""
        if self.runner_command is not None:  # a command of its own: no service runs it
            return None
        enabled, directory, socket_path = self.runner_service, self.runner_service_dir, self.runner_service_socket
        from airflow_comfy.config import get_settings

        try:
            current = get_settings()
        except ValueError as exc:
            raise AirflowFailException(f"the [comfy] settings are invalid: {exc}") from None
        socket_path = current.runner_service_socket if socket_path is None else socket_path
        if not socket_path.strip() and not (current.runner_service if enabled is None else enabled):
            return None
        return ServiceConfig(
            python=self.runner_python or sys.executable,
            directory=current.runner_service_dir if directory is None else directory,
            idle_timeout=current.runner_service_idle_timeout, cache_budget_mb=current.runner_service_cache_mb,
            cancel_grace=self.service_cancel_grace, cpu_slots=current.runner_service_cpu_slots,
            socket=socket_path.strip())

    def _run_in_service(self, config: ServiceConfig | None, command: list[str], argv: list[str],
                        env: dict[str, str]) -> tuple[int, list[str]] | None:
        """Run the job in the runner service: its exit code and last lines, or None when no service can run it
        (the caller runs the subprocess). A service that runs elsewhere and cannot run it fails the try."""
        if config is None:
            return None
        lease = self._lease
        session = ServiceSession(config, env, slot=slot_name(lease.device, lease.slot) if lease else None,
                                 log=self.log.info, should_stop=lambda: self._killed)
        self._session = session
        try:
            return self._run_session(session, command, argv, env)
        except ServiceUnavailable as exc:
            if config.external:
                raise AirflowException(external_service_failure(config.socket, exc)) from None
            self.log.warning("The runner service cannot run this job (%s): running a runner subprocess instead", exc)
            return None
        finally:
            try:
                session.stop()  # the job still runs only if this task was interrupted (timeout, kill)
            finally:
                session.close()
                self._session = None

    def _run_session(self, session: ServiceSession, command: list[str], argv: list[str],
                     env: dict[str, str]) -> tuple[int, list[str]]:
        session.open()
        if self._killed:
            raise AirflowException("The task was killed before its runner started")
        tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)

        def on_lines(lines: list[str]) -> None:
            for line in lines:
                tail.append(line)
                relay_line(self.log, line)

        def on_started() -> None:
            self.log.info("Running: %s", describe_run(command, self._group_name()))
            if self._killed:  # killed while the request was on its way: its cancel may not have been sent
                session.cancel()

        lease = self._lease
        fds = (lease.fd,) if lease is not None and lease.fd is not None else ()
        try:
            result: JobResult = session.run(argv, env, fds=fds, on_lines=on_lines, on_started=on_started)
        except ServiceDied as exc:
            after = ("The next try waits for it at its socket" if session.config.external
                     else "The next try starts a fresh runner service")
            raise AirflowException(f"{exc}. {after}.") from None
        self.log.info("The runner %s", result.describe())
        return result.code, list(tail)

    def _group_name(self) -> str:
        return self.group_spec.group if self.group_spec is not None else self.task_id

    def _stop_process(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def on_kill(self) -> None:
        self._killed = True
        self.log.warning(STOPPED_MESSAGE)
        session = self._session
        if session is not None:
            # The job stops at its next node or sampler step; execute() then sees its end and gives the device
            # back (the service holds the device lock until the job has stopped).
            session.cancel()
            return
        self._stop_process()
        self._release_device()


#: The worker's variables that go with every job to a runner service elsewhere: the store's (AWS_*: keys,
#: region, endpoint) and the runner's own settings (COMFY_*).
FORWARDED_ENV_PREFIXES = ("AWS_", "COMFY_")


def manifest_folder(service: ServiceConfig | None) -> tempfile.TemporaryDirectory[str]:
    """A fresh folder for the runner's ``--manifest-out``: beside the socket of a service that runs elsewhere
    (the one folder that both the task's and the service's containers see, at the same path), else in the
    worker's temporary folder."""
    if service is not None and service.external:
        try:
            return tempfile.TemporaryDirectory(prefix="manifest-", dir=os.path.dirname(service.socket))
        except OSError as exc:
            raise AirflowException(external_service_failure(service.socket, exc)) from None
    return tempfile.TemporaryDirectory(prefix="airflow-comfy-")


def external_service_failure(socket_path: str, exc: Exception) -> str:
    """The try's error when the runner service that runs elsewhere cannot take its job: what, where, what to
    do. Retried: the service may be starting or restarting."""
    return (f"The runner service at {socket_path} ([comfy] runner_service_socket) cannot run this group: {exc}. "
            "This worker never runs the runner itself: start that service (in the docker-compose stack, the "
            "'runner' service: `docker compose up -d runner`; elsewhere `python -m airflow_comfy.runner serve "
            f"--socket {socket_path}`) with the same socket folder, models folder and artifact store. The task is "
            "retried.")


def task_holder(context: Any, task_id: str) -> str:
    """Who holds a device, for its lock file and the logs of the tasks that wait for it."""
    ti = context.get("ti") if isinstance(context, Mapping) else None
    try:
        return f"{ti.dag_id}/{ti.task_id} {ti.run_id} try {ti.try_number}"
    except AttributeError:
        return task_id


#: Connection extra keys (as the amazon provider names them) and the runner's environment variable for each.
AWS_EXTRA_ENV = {
    "aws_session_token": "AWS_SESSION_TOKEN",
    "region_name": "AWS_DEFAULT_REGION",
    "endpoint_url": "AWS_ENDPOINT_URL_S3",
}

#: The worker's variables that name an AWS identity; dropped from the runner's environment when the credentials
#: come from ``aws_conn_id``.
AWS_IDENTITY_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
)


def aws_env_from_connection(conn_id: str) -> dict[str, str]:
    """``AWS_*`` environment variables from the Airflow connection ``conn_id``: login → ``AWS_ACCESS_KEY_ID``,
    password → ``AWS_SECRET_ACCESS_KEY`` and the extras in :data:`AWS_EXTRA_ENV`. Read through Airflow's own
    connection API (any secrets backend, ``AIRFLOW_CONN_*``, the metadata database); the secrets are
    registered with Airflow's log masker. A connection that is not defined fails the task (retried)."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:
        raise AirflowException(f"could not read the AWS connection {conn_id!r} ([comfy] aws_conn_id): {exc}") from None
    env: dict[str, str] = {}
    if conn.login:
        env["AWS_ACCESS_KEY_ID"] = conn.login
    if conn.password:
        env["AWS_SECRET_ACCESS_KEY"] = conn.password
    extra = conn.extra_dejson or {}
    for key, name in AWS_EXTRA_ENV.items():
        value = extra.get(key)
        if value:
            env[name] = str(value)
    _mask(env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN"))
    return env


def _mask(*secrets: str | None) -> None:
    """Ask Airflow's log masker to redact ``secrets`` in task logs (best effort)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older task SDKs
        return
    for secret in secrets:
        if secret:
            mask_secret(secret)


def raise_for_exit(returncode: int, tail: list[str]) -> None:
    """Map the runner's exit code to Airflow's failure semantics; the message's first line is the runner's own
    sentence (:mod:`airflow_comfy.operators.failure_text`), its output stays in the log only."""
    if returncode == EXIT_OK:
        return
    message = runner_failure(returncode, tail)
    if returncode == EXIT_BAD_INPUT:
        raise AirflowFailException(message)
    raise AirflowException(message)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest the runner wrote to ``--manifest-out``: a JSON object with ``manifest_uri``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise AirflowException(
            f"The runner exited with code {EXIT_OK} but wrote no manifest to --manifest-out {path}"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AirflowException(f"The runner's manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get(MANIFEST_URI_KEY), str):
        raise AirflowException(
            f"The runner's manifest {path} must be a JSON object with a string {MANIFEST_URI_KEY!r}, "
            f"got: {text[:200]}"
        )
    return manifest
