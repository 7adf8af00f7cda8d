"""The monitoring files under ``deploy/monitoring`` against the metrics the package sends, and the sending itself
through a real StatsD client into a UDP socket of the test (the scheduler's metrics module, as the preemption
watcher uses it).

A dashboard panel that queries a series nobody sends stays empty without an error; a mapping that does not match
our names leaves the labels in the metric name. Both are checked here, offline: the mapping's globs are matched
as statsd_exporter matches them (``*`` is one dot-separated part, the first mapping that matches wins).
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from airflow_comfy.metrics import METRIC_TYPES, PREEMPTIONS, group_tags, legacy_name
from airflow_comfy.scheduling.preemption import Preemption, TaskRef, count_preemption

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
STATSD_PREFIX = "airflow"
#: statsd_exporter's metric type of each StatsD type.
EXPORTER_TYPES = {"timer": "observer", "counter": "counter", "gauge": "gauge"}
#: The series a Prometheus metric of each exporter type is queried by.
SERIES_SUFFIXES = {"observer": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
TAGS = group_tags("my_dag", "sampling", "vip", "gpu_big")


def mappings() -> list[dict]:
    return yaml.safe_load((MONITORING / "statsd-mapping.yaml").read_text())["mappings"]


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def map_name(statsd_name: str, statsd_type: str) -> tuple[str, dict[str, str]] | None:
    """What statsd_exporter makes of a metric: (Prometheus name, labels), or None when it is dropped."""
    for mapping in mappings():
        wanted = mapping.get("match_metric_type")
        if wanted and wanted != EXPORTER_TYPES[statsd_type]:
            continue
        pattern = "^" + r"\.".join("([^.]+)" if part == "*" else re.escape(part)
                                   for part in mapping["match"].split(".")) + "$"
        found = re.match(pattern, statsd_name)
        if found is None:
            continue
        if mapping.get("action") == "drop":
            return None

        def fill(template: str, found: re.Match = found) -> str:
            return re.sub(r"\$\{?(\d+)\}?", lambda m: found.group(int(m.group(1))), template)

        return fill(mapping["name"]), {key: fill(value) for key, value in mapping.get("labels", {}).items()}
    raise AssertionError(f"no mapping of deploy/monitoring/statsd-mapping.yaml matches {statsd_name}")


def prometheus_series() -> dict[str, str]:
    """Every Prometheus series our metrics become -> the metric it comes from."""
    series = {}
    for metric, statsd_type in METRIC_TYPES.items():
        mapped = map_name(f"{STATSD_PREFIX}.{legacy_name(metric, TAGS)}", statsd_type)
        assert mapped is not None, f"{metric}: its labelled name is dropped"
        name, _ = mapped
        for suffix in SERIES_SUFFIXES[EXPORTER_TYPES[statsd_type]]:
            series[name + suffix] = metric
    return series


@pytest.mark.parametrize("metric", sorted(METRIC_TYPES))
def test_the_mapping_turns_each_metric_into_one_labelled_series(metric: str):
    statsd_type = METRIC_TYPES[metric]
    name, labels = map_name(f"{STATSD_PREFIX}.{legacy_name(metric, TAGS)}", statsd_type)
    assert labels == TAGS
    assert name.startswith("comfy_") and "my_dag" not in name and "gpu_big" not in name
    # the tag-less copy (its tags went nowhere: plain StatsD) is dropped, not counted twice
    assert map_name(f"{STATSD_PREFIX}.{metric}", statsd_type) is None


def test_a_task_id_with_a_dot_stays_one_label():
    tags = group_tags("my.dag", "group.sampling", "vip", "default_pool")
    _, labels = map_name(f"{STATSD_PREFIX}.{legacy_name('comfy.group.sampling', tags)}", "timer")
    assert labels == {"dag_id": "my_dag", "task_id": "group_sampling", "tier": "vip", "pool": "default_pool"}


def test_every_dashboard_query_names_series_we_send_and_every_metric_has_a_panel():
    board = dashboard()
    series = prometheus_series()
    shown = set()
    assert board["panels"], "the dashboard has no panels"
    for panel in board["panels"]:
        exprs = [target["expr"] for target in panel["targets"]]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = re.findall(r"\bcomfy_[a-z_]+", expr)
            assert names, f"panel {panel['title']!r}: {expr} queries no comfy_ series"
            unknown = [name for name in names if name not in series]
            assert not unknown, f"panel {panel['title']!r} queries {unknown}, which nothing sends"
            shown.update(series[name] for name in names)
    assert shown == set(METRIC_TYPES), f"metrics without a panel: {sorted(set(METRIC_TYPES) - shown)}"


def test_the_scrape_example_scrapes_the_exporter():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["statsd-exporter:9102"]


@pytest.fixture
def statsd_socket():
    """A UDP socket on a free loopback port, and the scheduler's metrics module sending StatsD to it."""
    from airflow.observability import stats
    from airflow.sdk._shared.observability.metrics.base_stats_logger import NoStatsLogger
    from airflow.sdk._shared.observability.metrics.statsd_logger import get_statsd_logger
    from statsd import StatsClient

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    port = sock.getsockname()[1]
    stats.initialize(factory=lambda: get_statsd_logger(stats_class=StatsClient, host="127.0.0.1", port=port,
                                                       prefix=STATSD_PREFIX), export_legacy_names=False)
    try:
        yield sock
    finally:
        stats.initialize(factory=NoStatsLogger, export_legacy_names=False)
        sock.close()


def test_a_preemption_is_counted_under_both_names(statsd_socket: socket.socket):
    victim = TaskRef("my_dag", "batch-1", "sampling", -1, 1)
    event = Preemption(victim=victim, by=TaskRef("my_dag", "vip-1", "sampling"), pool="gpu_big",
                       at="2026-11-27T00:00:00+00:00", count=1, tier="batch")
    count_preemption(event)
    received = {statsd_socket.recv(4096).decode() for _ in range(2)}
    assert received == {f"{STATSD_PREFIX}.{PREEMPTIONS}:1|c",
                        f"{STATSD_PREFIX}.{PREEMPTIONS}.my_dag.sampling.batch.gpu_big:1|c"}
