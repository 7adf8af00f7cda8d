"""The runner's line format as the task log reads it, KubernetesPodOperator's reading of it, and the manifest's
``stats`` (old manifests without it still load). The whole path, through real Airflow, is in
``tests/test_observability.py``."""

from __future__ import annotations

import logging
import sys

import pytest
from airflow.providers.cncf.kubernetes.utils.pod_manager import _parse_log_level

from airflow_comfy.artifacts.errors import BadArtifact
from airflow_comfy.artifacts.manifest import GroupManifest
from airflow_comfy.log_lines import RunnerLogFormatter, level_line, parse_line
from airflow_comfy.operators.runner_log import describe_run, pod_log_formatter
from airflow_comfy.runner.run_stats import COMPUTE, DECODE, LOAD, SAMPLING, node_role
from airflow_comfy.scheduling.tiers import tier_of_weight

BAD_INPUT = "airflow-comfy runner: bad input: node 10 (LoadImage): input 'image': input image 'x.png' not found"


def formatted(level: int, message: str, exc_info=None) -> list[str]:
    record = logging.LogRecord("airflow_comfy.runner", level, __file__, 1, message, None, exc_info)
    return RunnerLogFormatter("%(message)s").format(record).split("\n")


def test_each_line_of_a_record_carries_its_level_and_reads_back():
    assert formatted(logging.INFO, "node 5 (KSampler): start") == ["INFO node 5 (KSampler): start"]
    assert parse_line("INFO node 5 (KSampler): start") == (logging.INFO, "node 5 (KSampler): start")
    try:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    except RuntimeError:
        lines = formatted(logging.ERROR, "node 6 (VAEDecode) failed", sys.exc_info())
    assert len(lines) > 3 and all(parse_line(line)[0] == logging.ERROR for line in lines)
    assert parse_line(lines[-1])[1] == "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert parse_line(level_line("ERROR", BAD_INPUT)) == (logging.ERROR, BAD_INPUT)


@pytest.mark.parametrize("line", ["manifest: file:///x/manifest.json", "Warning: something printed by a library",
                                  "2026-11-27 12:00:00,000 WARNING an old runner's line", "INFOnode", ""])
def test_a_line_that_is_not_the_runners_stays_info_as_it_is(line: str):
    assert parse_line(line) == (logging.INFO, line)


@pytest.mark.parametrize(("line", "level"), [
    ("INFO node 5 (KSampler): start", logging.INFO),
    ("WARNING node 6 (VAEDecode): out of memory (...); memory freed, retrying once", logging.WARNING),
    (level_line("ERROR", BAD_INPUT), logging.ERROR),
])
def test_the_pod_operator_logs_a_runner_line_at_its_level_without_the_word(line: str, level: int):
    """KubernetesPodOperator reads the level from the container line; our formatter drops the word."""
    assert _parse_log_level(line) == level
    assert pod_log_formatter("base", line) == f"[base] {parse_line(line)[1]}"


def test_the_running_line_names_group_spec_and_hash():
    sha = "ab" * 32
    command = ["python", "-m", "airflow_comfy.runner", "run", "--spec", f"s3://b/p/specs/sha256/{sha}.json",
               "--spec-sha256", sha, "--params", '{"prompt": "' + "x" * 300 + '"}']
    line = describe_run(command, "sampling")
    assert line.startswith(f"group sampling: spec s3://b/p/specs/sha256/{sha}.json (sha256 {sha}); command: ")
    assert "...(" in line and "x" * 200 not in line


@pytest.mark.parametrize(("class_type", "role"), [
    ("CheckpointLoaderSimple", LOAD), ("LoraLoader", LOAD), ("VAELoader", LOAD), ("KSampler", SAMPLING),
    ("KSamplerAdvanced", SAMPLING), ("VAEDecode", DECODE), ("CLIPTextEncode", COMPUTE), ("SaveImage", COMPUTE),
    ("SomeCustomNode", COMPUTE),
])
def test_node_roles(class_type: str, role: str):
    assert node_role(class_type) == role


def manifest_dict(**extra) -> dict:
    return {"schema": "airflow-comfy/group-manifest", "version": 1, "workflow": {"name": "w", "sha256": ""},
            "group": "g", "run_key": "w/r", "try": 1, "outputs": [], **extra}


def test_manifest_stats_round_trip_and_old_manifests_have_none():
    assert GroupManifest.from_dict(manifest_dict()).stats == {}
    stats = {"nodes": {"5": {"class_type": "KSampler", "role": "sampling", "seconds": 1.5}},
             "totals": {"sampling_s": 1.5, "peak_rss_bytes": 123}}
    loaded = GroupManifest.from_dict(manifest_dict(stats=stats))
    assert loaded.stats == stats
    assert GroupManifest.from_json(loaded.to_json()).stats == stats


@pytest.mark.parametrize(("stats", "message"), [
    ([], "stats: expected an object, got list"),
    ({"totals": 3}, "stats.totals: expected an object, got int"),
])
def test_a_broken_stats_section_is_named(stats, message: str):
    with pytest.raises(BadArtifact, match=message):
        GroupManifest.from_dict(manifest_dict(stats=stats), uri="file:///m.json")


def test_tier_of_a_weight():
    tiers = {"vip": 10000, "high": 1000, "normal": 100, "batch": 10}
    assert [tier_of_weight(w, tiers) for w in (10000, 1001, 100, 11, 10, 9)] == [
        "vip", "high", "normal", "batch", "batch", "none"]


def test_group_pods_are_built_with_the_formatter():
    from airflow_comfy.operators.pod import ComfyGroupPodOperator

    task = ComfyGroupPodOperator(task_id="sampling", arguments=["run"], image="runner:1")
    assert task.log_formatter is pod_log_formatter
