# The browser page and its gateway (python -m lipsync.web): HTTP on 8080 (the page, the
# WebRTC offer, the WebSocket fallback) and WebRTC media on random UDP ports (no range can
# be pinned: docs/DELIVERY.md, TURN), talking to the compositing service at
# web.compositing_address (COMPOSITING_ADDRESS overrides it). The `web` extra: aiortc and
# PyAV (its wheels bring FFmpeg's libx264 and libopus), no OpenCV, no ONNX Runtime.
#   docker build -f deploy/web.Dockerfile -t lipsync-web:0.1.0 .
# (from the repository root; `make images` builds every image).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml deploy/image_requirements.py ./
RUN python3 image_requirements.py extra web pyproject.toml >requirements.txt \
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
RUN sh deploy/build_venv.sh project

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
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
  CMD ["python", "/opt/lipsync/healthcheck.py", "web"]
CMD ["python", "-m", "lipsync.web"]
