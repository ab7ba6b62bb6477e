# Two commands do everything on a fresh machine:
#   make demo   - set up .venv and run a real multi-process DualPipe training run on CPU
#   make test   - set up .venv and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dualpipe demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipelines.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info out
