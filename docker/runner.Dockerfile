# The runner image of airflow-comfy: `python -m airflow_comfy.runner` (group pods of the kubernetes backend) and
# `python -m airflow_comfy.runner serve` (the warm runner service of the docker-compose stack). torch, diffusers,
# transformers; models are mounted read-only at /models, never baked in; no credentials (they come from the
# environment: a Kubernetes Secret, or each job of the service).
#
# CUDA (the default):
#   docker build -f docker/runner.Dockerfile -t airflow-comfy-runner:dev-cuda .
# CPU only (torch's CPU build, a smaller image for trying it without a GPU):
#   docker build -f docker/runner.Dockerfile --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t airflow-comfy-runner:dev-cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG BUILDER_IMAGE=python:3.12-slim-bookworm

FROM ${BUILDER_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY airflow_comfy ./airflow_comfy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
# PyTorch's index of the build to install: cu128 (CUDA 12.8, matching the base image) or cpu.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Ubuntu 24.04's Python 3.12, in a virtualenv of its own (the system Python is externally managed).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned and from its build's index, so that the runner extra's unpinned torch is already met.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /tmp/wheels
# airflow-comfy[runner] from this checkout's wheel (its dependencies are ranges in pyproject.toml), then a check
# that CLIP's BPE merges (package data: real SD checkpoints need no tokenizer files) are in the installed package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "$(ls /tmp/wheels/airflow_comfy-*.whl)[runner]" \
 && rm -rf /tmp/wheels \
 && python -c "import pathlib, airflow_comfy as a; d = pathlib.Path(a.__file__).parent / 'runner/models/data'; assert list(d.glob('*.gz')), d"
# Group pods run as uid/gid 1000 with a read-only root filesystem and /tmp as their only writable place (see
# README "GPU pools"); the compose stack runs this image as the Airflow user (AIRFLOW_UID) instead. Ubuntu 24.04
# images come with a user `ubuntu` of uid 1000: it gives the id to ours.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu 2>/dev/null || userdel ubuntu; fi \
 && groupadd --gid 1000 runner && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp runner \
 && mkdir -p /models /input && chown runner:runner /input
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface
USER 1000:1000
WORKDIR /tmp
VOLUME ["/models"]
ENTRYPOINT ["python", "-m", "airflow_comfy.runner"]
CMD ["--help"]
