# Everything from a fresh machine with only Python 3: `make demo`, `make test`.
# TORCH_SPEC picks the torch build (default: the CPU wheel pinned below); PYTHON the interpreter.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint format bench bench-setup bench-quality clean

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

# Peer libraries for the comparisons; --no-deps keeps torch as installed (nflows would pull in
# tensorboard, which it never imports).
BENCH_PEERS ?= zuko==1.6.0 nflows==0.14

bench-setup: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(BENCH_PEERS)

# Speed table (MAF/NSF vs zuko and nflows) and a smoke run of the quality table.
bench: bench-setup
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/quality.py --quick

# The full quality table (hours on a CPU: run it on an otherwise idle machine).
bench-quality: bench-setup
	$(BIN)/python benchmarks/quality.py --json runs/quality.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
