# leukray — every target sets itself up: `make demo` and `make test` work on a fresh clone.
# VENV may point elsewhere (CI keeps one between runs); the package itself is always
# installed editable from *this* checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.leukray-deps-$(shell (cat pyproject.toml; uname -m) | sha256sum | cut -c1-12)
OUT ?= runs/demo
JOB ?= pipeline

.PHONY: setup demo test lint format bench clean submit-setup cluster-up dashboard cluster-down submit

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

# the suite in TEST_WORKERS processes (pytest-xdist), each test module whole in one of them
# (its module-scoped local Ray runtime and fixtures stay as they are); TEST_WORKERS=0 runs
# it in this process, one test after another; the 20 slowest tests are listed at the end
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

# ruff, configured in pyproject.toml (line length 120; CI runs `make lint` before `make test`)
lint: setup
	$(PY) -m ruff check leukray tests jobs
	$(PY) -m ruff format --check leukray tests jobs

format: setup
	$(PY) -m ruff format leukray tests jobs
	$(PY) -m ruff check --fix leukray tests jobs

# every section of the benchmark into bench.json (docs/measurements.md), then screening's
bench: setup
	$(PY) -m leukray.bench
	$(PY) -m leukray.bench --screen

# -- a Ray cluster (cluster.yaml, AWS; or KubeRay) -------------------------------------------
# Submitting needs only Ray's client, not leukray's PyTorch environment: these targets use
# $(RAY) from a small submit-only venv (ray[default] at the version pyproject.toml pins, and
# boto3 for the AWS launcher), made on first use. RAY=/path/to/ray uses another one.
# `make submit JOB=pipeline ARGS="--config jobs/configs/cnmc-s3.yaml"` submits jobs/$(JOB).py to
# $(RAY_ADDRESS) (default: the launcher cluster's job API as `make dashboard` forwards it), with
# the token from RAY_AUTH_TOKEN (export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...).
SUBMIT_VENV ?= .venv-submit
RAY_PIN := $(shell sed -n 's/.*"ray\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
RAY ?= $(SUBMIT_VENV)/bin/ray
RAY_ADDRESS ?= http://127.0.0.1:8265
ARGS ?=

submit-setup:
	@test -x "$(RAY)" || test "$(RAY)" != "$(SUBMIT_VENV)/bin/ray" || { \
	  echo "installing ray[default]==$(RAY_PIN) and boto3 into $(SUBMIT_VENV) (submit-only, no PyTorch)"; \
	  python3 -m venv $(SUBMIT_VENV) && $(SUBMIT_VENV)/bin/python -m pip install -q "ray[default]==$(RAY_PIN)" boto3; }

cluster-up: submit-setup
	@! grep -q 'sg-REPLACE-WITH-YOURS' cluster.yaml || { \
	  echo "cluster.yaml: put your security group in SecurityGroupIds first (jobs/aws/create-security-group.sh VPC_ID CIDR)" >&2; exit 2; }
	$(RAY) up -y cluster.yaml

dashboard: submit-setup
	$(RAY) dashboard cluster.yaml

cluster-down: submit-setup
	$(RAY) down -y cluster.yaml

submit: submit-setup
	$(RAY) job submit --address $(RAY_ADDRESS) --working-dir . --runtime-env jobs/runtime_env.yaml \
	  -- python jobs/$(JOB).py $(ARGS)

clean:
	rm -rf runs bench.json .pytest_cache
