# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project on first use, at the versions of requirements/lock.txt (the
# versions the test suite passed with); afterwards they skip the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch==2.13.0 is named in the same pip command as monai so that pip keeps the
# CPU wheel instead of pulling a multi-GB CUDA build (see docs/install.md).
TORCH ?= torch==2.13.0
# when make started (before any install): `make demo` prints its wall time including the install
T0 := $(shell date +%s)
# the tested versions; `make install LOCK=` installs the newest versions the floors in pyproject.toml allow
LOCK ?= requirements/lock.txt
SEEDS ?= 0,1,2

.PHONY: install demo test test-all bench floors clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile $(if $(LOCK),-c $(LOCK)) "$(TORCH)" -e ".[dev]"
	# byte-compile once, in parallel (~16 s on 2 cores): where PYTHONDONTWRITEBYTECODE=1 is set (this project's
	# CI machines set it) Python would otherwise recompile torch, MONAI and MLflow in every process (~6 s each)
	# (a module that does not compile here is only slower to import: a note, not a failed install)
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/|/testing/_internal/py3[0-9]+_' $(VENV)/lib medwsol >/dev/null \
		|| echo "note: some modules were not byte-compiled; they compile on import"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medwsol run pipelines/demo.yaml
	@echo "make demo: $$(( $$(date +%s) - $(T0) )) s including any install (load average $$(cut -d' ' -f1-3 /proc/loadavg))"

# the suite CI runs (3-7 min on 2 cores); the end-to-end tests marked slow (pipelines, Dask clusters, torchrun,
# an MLflow server, model serving: ~20 min more on 2 cores) run with `make test-all`
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# every method on the demo, once per seed, mean ± sd (hours on 2 CPU cores; rewrites docs/benchmarks.md)
bench: $(STAMP)
	$(BIN)/medwsol benchmark methods pipelines/demo.yaml --seeds $(SEEDS)

# the dependency floors of pyproject.toml in a venv of their own (.venv-floors), then the fast tests
floors:
	PY=$(PY) bash .ci/floors.sh

clean:
	rm -rf $(VENV) .venv-floors runs data mlflow.db mlartifacts .pytest_cache
