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

# UltraMem vs dense at equal FLOPs/token on CPU (offline): bundled corpus + invented facts; val loss and fact recall.
demo: $(STAMP)
	$(BIN)/ultramem demo --out runs/demo

# Two invocations: the suite (slow and interpreter tests deselected by pyproject's addopts; only
# GPU tests skip without a GPU), then the Triton kernel tests under the interpreter, which needs
# TRITON_INTERPRET=1 before Triton is imported. Slow tests: `$(BIN)/python -m pytest -m slow tests`.
test: $(STAMP)
	$(BIN)/python -m pytest tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/ops -m interpreter

lint: $(STAMP)
	$(BIN)/ruff check ultramem tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
