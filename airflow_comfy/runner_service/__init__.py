"""The warm runner service's socket protocol and the task's side of it (standard library only: neither torch
nor Airflow). The service itself is :mod:`airflow_comfy.runner.service`."""
