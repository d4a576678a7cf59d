# Lip-sync serving: `make demo` renders the bundled avatar; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The GPU build of ONNX Runtime where an NVIDIA driver answers, else the CPU build.
ORT_EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PROTOS := $(wildcard shared_proto/*.proto)
STUBS := shared_proto/compositing_pb2.py shared_proto/inference_pb2.py

.PHONY: setup run test lint demo bench clean help

help:
	@echo "make setup  - create .venv, install dependencies, generate gRPC stubs (idempotent)"
	@echo "make run    - run both services in the foreground (Ctrl-C stops both)"
	@echo "make demo   - render assets/speech/demo.wav with the demo avatar to out/demo.mp4"
	@echo "make test   - lint and run the test suite"
	@echo "make bench  - benchmark every stage and the end-to-end pipeline"

$(VENV)/.installed-$(ORT_EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,render,$(ORT_EXTRA)]"
	rm -f $(VENV)/.installed-*
	touch $@

$(STUBS): $(PROTOS) $(VENV)/.installed-$(ORT_EXTRA)
	$(PY) scripts/gen_proto.py

setup: $(VENV)/.installed-$(ORT_EXTRA) $(STUBS)

run: setup
	$(PY) -m lipsync.launch

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m lipsync.demo

# PyTorch (the `convert` extra) runs the reference script's way beside ours.
bench: setup
	$(PIP) install -q -e ".[convert]"
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.stream_latency

clean:
	rm -rf $(VENV) out shared_proto/*_pb2*.py shared_proto/*_pb2*.pyi
