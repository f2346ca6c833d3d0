# sectune — every entry point the README names.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/sectune
VENV ?= $(CACHE)/venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXTRAS ?= operator,trainer,dev

.PHONY: setup demo upload-example test test-unit test-cluster test-e2e lint typecheck crds check-crds dashboards check-dashboards test-env clean

# Python environment outside the repository (torch is a few GB; installed once per machine).
$(VENV)/.installed-%: pyproject.toml
	@mkdir -p $(CACHE)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[$(EXTRAS)]'
	@# DeepSpeed's sdist imports torch while building: after torch, without build isolation,
	@# ops left to JIT on GPU machines. Only its config parser runs here (tests/unit).
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation deepspeed==0.19.8
	@touch $@

setup: $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
	@# editable install points at this checkout (CI clones afresh each run)
	@$(PIP) install --quiet --no-deps -e . >/dev/null

## The main job: demo base model (converted once, cached) + sectune run on an example.
demo: setup
	$(VENV)/bin/sectune models fetch-demo
	$(VENV)/bin/sectune run examples/attack-tactics/finetunejob.yaml

## examples/cluster's data and the demo base model into s3://sectune-example (AWS_* from the env).
upload-example: setup
	$(PY) hack/upload_example.py

## Every test tier. .ci/run calls exactly this.
test: setup test-env lint typecheck check-crds check-dashboards
	$(PY) -m pytest -p no:cacheprovider -ra tests

test-env:
	bash hack/test-env.sh

test-unit: setup
	$(PY) -m pytest -ra tests/unit

test-cluster: setup test-env
	$(PY) -m pytest -ra tests/cluster

test-e2e: setup test-env
	$(PY) -m pytest -ra tests/e2e

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

crds: setup
	$(PY) -m sectune_operator.crd

check-crds: setup
	$(PY) -m sectune_operator.crd --check

## Grafana dashboards, generated into the chart from sectune_operator.dashboards.
dashboards: setup
	$(PY) -m sectune_operator.dashboards

check-dashboards: setup
	$(PY) -m sectune_operator.dashboards --check

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
