# Everything from a fresh machine with only Python 3: `make demo`, `make test`.
# TORCH_SPEC picks the torch build (default: the CPU wheel pinned below); PYTHON the interpreter.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

# Fit the default flow to two moons; writes runs/moons/{model.safetensors,config.json,metrics.json,*.png}
demo: setup
	$(BIN)/pushforward fit moons --out runs/moons --force
	$(BIN)/pushforward eval runs/moons moons

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
