# The compositing service: gRPC on 50052, the port clients use. CPU only: it carries no
# ONNX Runtime and no librosa (the `compositing` extra).
#   docker build -f deploy/compositing.Dockerfile -t lipsync-compositing:0.1.0 .
# (from the repository root; `make images` builds every image). BASE_IMAGE: a Debian
# bookworm image with Python 3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The requirement lists, alone: the dependency layer below is rebuilt only when they change.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml deploy/image_requirements.py ./
RUN python3 image_requirements.py extra compositing pyproject.toml >requirements.txt \
 && python3 image_requirements.py build pyproject.toml >build-requirements.txt

# The dependencies: a stage (and an image layer) of their own.
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/build_venv.sh deploy/constraints.txt deploy/cuda-constraints.txt deploy/
COPY --from=requirements /src/requirements.txt /src/build-requirements.txt deploy/
RUN sh deploy/build_venv.sh deps

# The project itself, into /opt/app.
FROM deps AS builder
COPY . .
RUN sh deploy/build_venv.sh project \
 && ! /opt/venv/bin/python -c "import onnxruntime" 2>/dev/null \
 && ! /opt/venv/bin/python -c "import librosa" 2>/dev/null

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 lipsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lipsync
COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /opt/app /opt/app
COPY deploy/healthcheck.py /opt/lipsync/healthcheck.py
COPY deploy/image-config.yaml /opt/lipsync/config.yaml
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    LIPSYNC_CONFIG=/opt/lipsync/config.yaml
WORKDIR /tmp
USER 10001:10001
EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=6s --start-period=60s --retries=3 \
  CMD ["python", "/opt/lipsync/healthcheck.py", "compositing"]
CMD ["python", "-m", "compositing_service"]
