"""The Airflow plugin of this package (``airflow.plugins`` entry point): its listener starts the VIP preemption
watcher in the scheduler (:mod:`airflow_comfy.scheduling.listener`), and importing it registers the format of
image params (:mod:`airflow_comfy.factory.param_formats`), so that the api-server refuses a bad input image at
trigger time with a sentence. Cheap to import: Airflow loads plugins in every process."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_comfy.factory.param_formats import register_param_formats
from airflow_comfy.scheduling import listener

register_param_formats()


class ComfyPlugin(AirflowPlugin):
    name = "airflow_comfy"
    listeners = [listener]
