# The two commands of the README. Each creates .venv if missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is a local CPU wheel on the project's CPU machines; elsewhere any torch >= 2.11 works:
# `make TORCH_SPEC='torch>=2.11' test`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,triton,train,hf,eval]"
	touch $(STAMP)

# Trains tiny-ultramem and tiny-dense on the bundled corpus on CPU (offline), prints a comparison.
demo: $(STAMP)
	$(BIN)/ultramem demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check ultramem tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
