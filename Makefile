# airflow-comfy: `make demo` and `make test` work on a fresh machine (they create the virtualenv).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
DEMO    ?= .demo

# Nothing may reach a model hub: demo and tests build what they need.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

# torch goes first and pinned: 2.13.0 is a CPU build on this machine's disk, while an unpinned torch pulled
# in by any dependency would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[runner,dev]'
	touch $@

lint: install
	$(VENV)/bin/ruff check airflow_comfy tests benchmarks dags

test: lint
	$(VENV)/bin/pytest -q

demo: install
	VENV=$(VENV) DEMO=$(DEMO) bash scripts/demo.sh

bench: install
	$(PY) benchmarks/parse.py
	$(PY) benchmarks/runner.py --repeat 2

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache build *.egg-info
