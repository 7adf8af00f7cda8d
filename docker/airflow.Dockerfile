# The Airflow image of airflow-comfy: the official Apache Airflow image plus the provider, nothing else.
# No torch, no diffusers: the scheduler, dag-processor, api-server, triggerer and the workers of the kubernetes
# backend only build DAGs and pods. The runner (torch) lives in docker/runner.Dockerfile.
#
#   docker build -f docker/airflow.Dockerfile -t airflow-comfy-airflow:dev .
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.12
ARG BUILDER_IMAGE=python:3.12-slim-bookworm

# The provider's wheel, built from this checkout (package data included: the node configs and CLIP's merges).
FROM ${BUILDER_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY airflow_comfy ./airflow_comfy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${AIRFLOW_IMAGE}
COPY --from=wheel /wheels /tmp/wheels
# Pinning apache-airflow to the image's own version keeps pip from upgrading or downgrading Airflow itself.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /tmp/wheels/airflow_comfy-*.whl \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
# The two loader stubs, for a dags folder that is not mounted (the Helm values mount the workflows beside them).
COPY --chown=airflow:root dags/comfy_workflows.py dags/comfy_workflow_errors.py /opt/airflow/dags/
ENV HF_HUB_OFFLINE=1
