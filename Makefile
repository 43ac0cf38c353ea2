# leukray — every target sets itself up: `make demo` and `make test` work on a fresh clone.
# VENV may point elsewhere (CI keeps one between runs); the package itself is always
# installed editable from *this* checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.leukray-deps-$(shell (cat pyproject.toml; uname -m) | sha256sum | cut -c1-12)
OUT ?= runs/demo
JOB ?= pipeline

.PHONY: setup demo test test-all bench clean

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

bench: setup
	$(PY) -m leukray.bench

clean:
	rm -rf runs bench.json .pytest_cache
