# airflow-comfy: `make demo` and `make test` work on a fresh machine (they create the virtualenv).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
DEMO    ?= .demo

# Nothing may reach a model hub: demo and tests build what they need.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench bench-scheduling clean postgres compose-parser

# Two installs, each remembered by a stamp file: `make demo` needs the runner extra only; lint, test and bench
# also need the dev extra (pytest, ruff, moto, the workflow templates, dag-factory).
RUNNER_STAMP := $(VENV)/.installed-runner
DEV_STAMP    := $(VENV)/.installed-dev

# torch goes in first, on its own and pinned, so that the unpinned torch that the runner's dependencies ask for
# is already satisfied and does not resolve to a multi-GB CUDA build. TORCH is that pip requirement. PyPI's
# Linux torch wheel is itself a CUDA build: for a CPU-only machine take it from PyTorch's CPU index, e.g.
#   make demo TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'
# With a GPU, install your own CUDA build of torch into $(VENV) first and run make with TORCH= (empty) to keep it.
TORCH ?= torch==2.13.0

install: $(DEV_STAMP)

$(RUNNER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(strip $(TORCH)),$(PIP) install -q $(TORCH))
	$(PIP) install -q -e '.[runner]'
	touch $@

$(DEV_STAMP): $(RUNNER_STAMP) pyproject.toml
	$(PIP) install -q -e '.[runner,dev]'
	touch $@

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check airflow_comfy tests benchmarks dags

# The scheduler tests start their own PostgreSQL server (tests/postgres.py) from Debian's postgresql package.
# As root (CI: a fresh container), install it when it is missing; otherwise say how, and let those tests fail.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the PostgreSQL server for the scheduler tests: apt-get install -y postgresql"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	else echo "WARNING: no PostgreSQL server binaries; the scheduler tests will fail." \
	          "Install them with: sudo apt-get install -y postgresql" >&2; fi

# tests/test_deploy.py parses docker-compose.yaml with Debian's docker-compose (`docker-compose config` works
# offline, without a container engine). As root (CI: a fresh container), install it when it is missing;
# otherwise say how, and let that test fail.
compose-parser:
	@if command -v docker-compose >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the compose parser for the deploy tests: apt-get install -y docker-compose"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; \
	else echo "WARNING: no docker-compose; the compose file's test will fail." \
	          "Install it with: sudo apt-get install -y docker-compose" >&2; fi

test: lint postgres compose-parser
	$(VENV)/bin/pytest -q

demo: $(RUNNER_STAMP)
	VENV=$(VENV) DEMO=$(DEMO) bash scripts/demo.sh

bench: $(DEV_STAMP)
	$(PY) benchmarks/parse.py
	$(PY) benchmarks/runner.py --repeat 2 --warm-repeat 2

# VIP latency with a real scheduler (LocalExecutor, PostgreSQL): 20 normal runs of ~60 s sampling saturate a
# 2-slot pool, then a vip run; preemption off, then on. Long: about 2 x (21 x sampling time / 2) plus setup.
bench-scheduling: $(DEV_STAMP) postgres
	$(PY) benchmarks/vip_latency.py --runs 20 --sampling-seconds 60 --slots 2

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache build *.egg-info
