"""Retry settings of group tasks: the ``[comfy]`` defaults (retries, retry_delay, retry_exponential_backoff,
max_retry_delay) apply where the workflow's sidecar says nothing; the sidecar's own values win."""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_operators import encode_spec, settings

from airflow_comfy.config import get_settings, parse_backoff
from airflow_comfy.factory.loader import task_config_for
from airflow_comfy.factory.sidecar import parse_sidecar
from airflow_comfy.operators import build_group_task
from airflow_comfy.workflow.errors import WorkflowError


def test_comfy_retry_settings_apply_when_the_sidecar_is_silent():
    comfy = settings(retries=4, retry_delay=15.0, retry_exponential_backoff=True, max_retry_delay=600.0)
    silent = task_config_for(parse_sidecar("", "wf.comfy.yaml"), "sample", comfy)
    assert (silent.retries, silent.retry_delay_seconds, silent.backoff_multiplier, silent.max_retry_delay_seconds) == (
        4, 15.0, 2.0, 600.0)
    sidecar = parse_sidecar("retries: 1\nretry_delay: 5\nretry_exponential_backoff: 3\nmax_retry_delay: 60\n"
                            "tasks: {other: {retry_exponential_backoff: false, retries: 0}}\n", "wf.comfy.yaml")
    own = task_config_for(sidecar, "sample", comfy)
    assert (own.retries, own.retry_delay_seconds, own.backoff_multiplier, own.max_retry_delay_seconds) == (
        1, 5.0, 3.0, 60.0)
    other = task_config_for(sidecar, "other", comfy)
    assert (other.retries, other.backoff_multiplier) == (0, 0.0)
    task = build_group_task(encode_spec(), task_config=silent, settings=comfy, upstream_task_ids=[])
    assert (task.retries, task.retry_delay, task.retry_exponential_backoff, task.max_retry_delay) == (
        4, timedelta(seconds=15), 2.0, timedelta(seconds=600))
    plain = build_group_task(encode_spec(), task_config=task_config_for(parse_sidecar("", "x"), "s", settings()),
                             settings=settings(), upstream_task_ids=[])
    assert (plain.retries, plain.retry_delay, plain.retry_exponential_backoff) == (0, timedelta(seconds=60), 0)
    assert plain.max_retry_delay is None


def test_comfy_retry_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for name, value in (("RETRIES", "2"), ("RETRY_DELAY", "7.5"), ("RETRY_EXPONENTIAL_BACKOFF", "true"),
                        ("MAX_RETRY_DELAY", "3600")):
        monkeypatch.setenv(f"AIRFLOW__COMFY__{name}", value)
    comfy = get_settings()
    assert (comfy.retries, comfy.retry_delay, comfy.retry_exponential_backoff, comfy.max_retry_delay) == (
        2, 7.5, True, 3600.0)
    monkeypatch.setenv("AIRFLOW__COMFY__MAX_RETRY_DELAY", "")
    assert get_settings().max_retry_delay is None
    assert (parse_backoff("false"), parse_backoff("2.5"), parse_backoff(""), parse_backoff("on")) == (
        False, 2.5, False, True)
    for bad in ("sometimes", "-1"):
        with pytest.raises(ValueError, match="retry_exponential_backoff"):
            parse_backoff(bad)
    for name, value in (("RETRIES", "-1"), ("RETRY_DELAY", "-5")):
        monkeypatch.setenv(f"AIRFLOW__COMFY__{name}", value)
        with pytest.raises(ValueError, match="must not be negative"):
            get_settings()
        monkeypatch.delenv(f"AIRFLOW__COMFY__{name}")


@pytest.mark.parametrize("text", ["retry_exponential_backoff: -2", "retry_exponential_backoff: often",
                                  "max_retry_delay: -1", "max_retry_delay: soon"])
def test_bad_retry_settings_in_a_sidecar(text: str):
    with pytest.raises(WorkflowError, match="retry_exponential_backoff|max_retry_delay"):
        parse_sidecar(text, "wf.comfy.yaml")
