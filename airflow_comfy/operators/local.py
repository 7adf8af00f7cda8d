"""Run one group as a local subprocess: the very command a group pod runs, on the worker itself."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_comfy.operators.command import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    MANIFEST_URI_KEY,
    local_arguments,
    runner_prefix,
)
from airflow_comfy.operators.spec_publish import publish_group_spec
from airflow_comfy.workflow.groupspec import GroupSpec

#: How many of the runner's last output lines an error message quotes.
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

    Returns the manifest the runner wrote (pushed as XCom ``return_value``). Exit code 2 (bad input) raises
    ``AirflowFailException`` (no retry); any other failure raises ``AirflowException`` (retried).
    """

    template_fields: Sequence[str] = ("arguments", "env")
    template_fields_renderers = {"arguments": "py", "env": "json"}
    ui_color = "#e8f4fd"

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
        self._process: subprocess.Popen[str] | None = None

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

    def execute(self, context: Any) -> dict[str, Any]:
        credentials = aws_env_from_connection(self.aws_conn_id) if self.aws_conn_id else None
        if self.group_spec is not None and self.spec_sha256 and self.store:
            publish_group_spec(self.group_spec, self.spec_sha256, self.store, aws_env=credentials, log=self.log)
        with tempfile.TemporaryDirectory(prefix="airflow-comfy-") as tmp:
            manifest_out = os.path.join(tmp, "manifest.json")
            returncode, tail = self._run(self.command(manifest_out), self.subprocess_env(credentials))
            raise_for_exit(returncode, tail)
            manifest = read_manifest(manifest_out)
        self.log.info("Runner manifest: %s", manifest.get(MANIFEST_URI_KEY))
        return manifest

    def _run(self, command: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
        """Run ``command``, streaming its output (stdout and stderr) line by line into the task log."""
        self.log.info("Running: %s", describe_command(command))
        tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
        try:
            self._process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
                errors="backslashreplace",
                bufsize=1,
            )
        except OSError as exc:
            raise AirflowException(f"could not start the runner {command[0]!r}: {exc}") from exc
        try:
            assert self._process.stdout is not None
            for raw in self._process.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                self.log.info("%s", line)
            returncode = self._process.wait()
        finally:
            self._stop_process()  # still running only if we were interrupted (timeout, kill)
        return returncode, list(tail)

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
        self._stop_process()


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


def describe_command(command: list[str], max_arg: int = 120) -> str:
    """The command for the log, with long arguments (the spec's data: URI) shortened."""
    short = [arg if len(arg) <= max_arg else f"{arg[:max_arg]}...({len(arg)} chars)" for arg in command]
    return " ".join(short)


def raise_for_exit(returncode: int, tail: list[str]) -> None:
    """Map the runner's exit code to Airflow's failure semantics."""
    if returncode == EXIT_OK:
        return
    output = "\n".join(tail) or "(no output)"
    if returncode == EXIT_BAD_INPUT:
        raise AirflowFailException(
            f"The runner refused its input (exit code {EXIT_BAD_INPUT}; not retried). Last output:\n{output}"
        )
    raise AirflowException(f"The runner failed with exit code {returncode}. Last output:\n{output}")


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
