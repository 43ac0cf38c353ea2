# leukray — every target sets itself up: `make demo` and `make test` work on a fresh clone.
# VENV may point elsewhere (CI keeps one between runs); the package itself is always
# installed editable from *this* checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.leukray-deps-$(shell (cat pyproject.toml; uname -m) | sha256sum | cut -c1-12)
OUT ?= runs/demo
JOB ?= pipeline

.PHONY: setup demo test lint format bench clean cluster-up cluster-down submit

setup: $(DEPS_STAMP)
	@$(PY) -c "import leukray, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(leukray.__file__))) != os.getcwd())" 2>/dev/null \
	  || $(PY) -m pip install -q --no-deps --no-build-isolation -e .

$(DEPS_STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing leukray's dependencies into $(VENV) (first time only: several minutes, ~7 GB with PyTorch)"
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.leukray-deps-* && touch $@

demo: setup
	$(VENV)/bin/leukray demo --out $(OUT)

test: setup
	$(PY) -m pytest -q

# ruff, configured in pyproject.toml (line length 120; CI runs `make lint` before `make test`)
lint: setup
	$(PY) -m ruff check leukray tests jobs
	$(PY) -m ruff format --check leukray tests jobs

format: setup
	$(PY) -m ruff format leukray tests jobs
	$(PY) -m ruff check --fix leukray tests jobs

bench: setup
	$(PY) -m leukray.bench

# -- a Ray cluster (cluster.yaml, AWS) ------------------------------------------------------
# `make submit JOB=pipeline ARGS="--config jobs/configs/cnmc-s3.yaml"` submits jobs/$(JOB).py to
# $(RAY_ADDRESS), or to the launcher cluster's job API port-forwarded by `ray dashboard cluster.yaml`.
RAY_ADDRESS ?= http://127.0.0.1:8265
ARGS ?=

cluster-up: setup
	$(VENV)/bin/ray up -y cluster.yaml

cluster-down: setup
	$(VENV)/bin/ray down -y cluster.yaml

submit: setup
	$(VENV)/bin/ray job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python jobs/$(JOB).py $(ARGS)

clean:
	rm -rf runs bench.json .pytest_cache
