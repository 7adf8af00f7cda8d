"""The task's first step, on both backends: put its GroupSpec into the artifact store at its content address.

The runner command names the spec by URI and sha256 (:mod:`airflow_comfy.operators.command`); this writes the
object those name, from the worker, just before the runner subprocess or the group pod starts. The spec was
serialized at parse time to get its hash; here the same GroupSpec makes the same bytes again (checked).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_comfy.artifacts.errors import ArtifactError, StoreRefused
from airflow_comfy.artifacts.limits import StoreLimits
from airflow_comfy.artifacts.specs import publish_spec
from airflow_comfy.artifacts.store import ArtifactStore, open_store
from airflow_comfy.workflow.groupspec import GroupSpec


def s3_options(aws_env: dict[str, str] | None) -> dict[str, Any]:
    """``open_store`` options for an S3 store from the ``AWS_*`` variables a task read from its Airflow
    connection (``aws_env_from_connection``); empty when there are none (boto3's default chain applies)."""
    if not aws_env:
        return {}
    credentials = {name: aws_env[env] for name, env in (
        ("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ("aws_session_token", "AWS_SESSION_TOKEN")) if aws_env.get(env)}
    options: dict[str, Any] = {"credentials": credentials or None}
    if aws_env.get("AWS_ENDPOINT_URL_S3"):
        options["endpoint_url"] = aws_env["AWS_ENDPOINT_URL_S3"]
    if aws_env.get("AWS_DEFAULT_REGION"):
        options["region_name"] = aws_env["AWS_DEFAULT_REGION"]
    return options


def worker_store_limits() -> StoreLimits:
    """The ``[comfy] store_*`` timeouts (the defaults when the settings cannot be read)."""
    from airflow_comfy.config import get_settings

    try:
        return get_settings().store_limits
    except ValueError:
        return StoreLimits()


def open_task_store(store_uri: str, *, aws_env: dict[str, str] | None = None) -> ArtifactStore:
    """The artifact store as the worker opens it: an S3 store with the credentials a task read from its Airflow
    connection (``aws_env``), if any; every operation bounded by the ``[comfy] store_*`` timeouts."""
    options = s3_options(aws_env) if store_uri.startswith("s3://") else {}
    return open_store(store_uri, limits=worker_store_limits(), **options)


def publish_group_spec(spec: GroupSpec, sha256: str, store_uri: str, *, aws_env: dict[str, str] | None = None,
                       log: logging.Logger | Any = None) -> str:
    """Write ``spec`` to ``store_uri`` at its content address (once; an intact copy is left as it is) and
    return the URI the runner reads. A store that cannot be written fails the task (retried)."""
    data = spec.to_bytes()
    store = open_task_store(store_uri, aws_env=aws_env)
    try:
        with quiet_aws_logs():
            uri = publish_spec(store, data, sha256)
    except ValueError as exc:  # publish_spec hashes the bytes: they are not the ones the task was built with
        raise AirflowException(f"group {spec.group!r}: {exc} (the sha256 the task was built with); please report "
                               "this as a bug of airflow-comfy") from None
    except StoreRefused as exc:  # a read-only or forbidden location, no such bucket: no retry changes that
        raise AirflowFailException(f"could not write the group spec to the artifact store: {exc} (not retried: "
                                   "fix [comfy] artifact_store or its permissions)") from None
    except ArtifactError as exc:
        raise AirflowException(f"could not write the group spec to the artifact store: {exc}") from None
    if log is not None:
        log.info("Group spec: %s (sha256 %s, %d bytes)", uri, sha256, len(data))
    return uri


@contextlib.contextmanager
def quiet_aws_logs() -> Iterator[None]:
    """boto3/botocore log each signed request (access key id included) at DEBUG: keep that out of the task's
    log, whatever the worker's log level, while this task talks to the store."""
    loggers = [logging.getLogger(name) for name in ("boto3", "botocore", "urllib3", "s3transfer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
