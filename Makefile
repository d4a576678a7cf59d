# Lip-sync serving: `make demo` renders the bundled avatar; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The inference extra with the GPU build of ONNX Runtime where an NVIDIA driver answers,
# else the one with the CPU build (pyproject.toml lists the extras).
ORT_EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo inference-gpu || echo inference)
# pipecat-ai without its dependencies: its pins exclude this project's protobuf (the
# `pipecat` extra in pyproject.toml lists the rest of what it needs).
PIPECAT := pipecat-ai>=1.14.0,<2
PROTOS := $(wildcard shared_proto/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py) $(PROTOS:.proto=_pb2_grpc.py)

.PHONY: setup run test lint demo bench clean help

help:
	@echo "make setup  - create .venv, install dependencies, generate gRPC stubs (idempotent)"
	@echo "make run    - run both services in the foreground (Ctrl-C stops both)"
	@echo "make demo   - render assets/speech/demo.wav with the demo avatar to out/demo.mp4"
	@echo "make test   - lint and run the test suite"
	@echo "make bench  - benchmark every stage and the end-to-end pipeline"

# Everything, for development: the client (base), both services, the web page, tools and
# the voice-agent integrations (pipecat, LiveKit Agents).
$(VENV)/.installed-$(ORT_EXTRA): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,render,whip,web,tools,compositing,tracing,pipecat,livekit,$(ORT_EXTRA)]"
	$(PIP) install -q --no-deps "$(PIPECAT)"
	rm -f $(VENV)/.installed-*
	touch $@

# The gRPC stubs of every shared_proto/*.proto, into shared_proto/ (the editable install
# writes them too; this rule keeps them fresh when a .proto changes). Wheels generate
# their own at build time (setup.py).
$(STUBS) &: $(PROTOS) scripts/gen_proto.py $(VENV)/.installed-$(ORT_EXTRA)
	$(PY) scripts/gen_proto.py

setup: $(VENV)/.installed-$(ORT_EXTRA) $(STUBS)

run: setup
	$(PY) -m lipsync.local.launch

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m lipsync.local.demo

# PyTorch (the `convert` extra) runs the reference script's way beside ours.
bench: setup
	$(PIP) install -q -e ".[convert]"
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.stream_latency
	$(PY) -m benchmarks.h264 --presets ultrafast,superfast,veryfast
	$(PY) -m benchmarks.webrtc

clean:
	rm -rf $(VENV) out shared_proto/*_pb2*.py shared_proto/*_pb2*.pyi

# Container images (deploy/*.Dockerfile, docs/DEPLOY.md): `make images` builds all four;
# IMAGES=... a subset, IMAGE_TAG the tag, BASE_IMAGE another Debian bookworm + Python 3.11
# base, DOCKER_BUILD_FLAGS more `docker build` flags.
IMAGES ?= inference inference-cpu compositing web
IMAGE_TAG ?= 0.1.0
BASE_IMAGE ?= python:3.11-slim-bookworm
DOCKER ?= docker
DOCKER_BUILD_FLAGS ?=
IMAGE_FILE = deploy/$(if $(filter inference-cpu,$(1)),inference,$(1)).Dockerfile
IMAGE_NAME = lipsync-$(if $(filter inference-cpu,$(1)),inference:$(IMAGE_TAG)-cpu,$(1):$(IMAGE_TAG))
IMAGE_ARGS = $(if $(filter inference-cpu,$(1)),--build-arg EXTRA=inference --build-arg EXTRA_PACKAGES=)

.PHONY: images
images:
	@set -e; for image in $(IMAGES); do case $$image in \
	  inference|inference-cpu|compositing|web) ;; \
	  *) echo "make images: unknown image $$image (inference inference-cpu compositing web)"; exit 2;; \
	esac; done
	$(foreach image,$(IMAGES),$(DOCKER) build -f $(call IMAGE_FILE,$(image)) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) $(call IMAGE_ARGS,$(image)) $(DOCKER_BUILD_FLAGS) \
	  -t $(call IMAGE_NAME,$(image)) . &&) true
	@$(DOCKER) image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
	  | grep -E '^lipsync-(inference|compositing|web):$(IMAGE_TAG)(-cpu)? ' || true
