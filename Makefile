# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project on first use; afterwards they skip the install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch==2.13.0 is named in the same pip command as monai so that pip keeps the
# CPU wheel instead of pulling a multi-GB CUDA build (see docs/install.md).
TORCH ?= torch==2.13.0
# when make started (before any install): `make demo` prints its wall time including the install
T0 := $(shell date +%s)

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medwsol run pipelines/demo.yaml
	@echo "make demo: $$(( $$(date +%s) - $(T0) )) s including any install (load average $$(cut -d' ' -f1-3 /proc/loadavg))"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/methods.py pipelines/demo.yaml

clean:
	rm -rf $(VENV) runs data mlflow.db mlartifacts .pytest_cache
