"""The Airflow plugin of this package (``airflow.plugins`` entry point): its listener starts the VIP preemption
watcher in the scheduler (:mod:`airflow_comfy.scheduling.listener`). Cheap to import: Airflow loads plugins in
every process."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_comfy.scheduling import listener


class ComfyPlugin(AirflowPlugin):
    name = "airflow_comfy"
    listeners = [listener]
