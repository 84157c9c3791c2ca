# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project on first use; afterwards they skip the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch==2.13.0 is named in the same pip command as monai so that pip keeps the
# CPU wheel instead of pulling a multi-GB CUDA build (see docs/install.md).
TORCH ?= torch==2.13.0

SEEDS ?= 0,1,2

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medwsol run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# every method on the demo, once per seed, mean ± sd (hours on 2 CPU cores; rewrites docs/benchmarks.md)
bench: $(STAMP)
	$(BIN)/medwsol benchmark methods pipelines/demo.yaml --seeds $(SEEDS)

clean:
	rm -rf $(VENV) runs data mlflow.db mlartifacts .pytest_cache
