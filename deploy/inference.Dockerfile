# The inference service: gRPC on 50051. By default onnxruntime-gpu with CUDA 13 and
# cuDNN 9 from NVIDIA's pip wheels (the host needs only the NVIDIA driver >= 580 and the
# NVIDIA Container Toolkit); without a usable GPU it logs the fallback and runs on the
# CPU. `--build-arg EXTRA=inference --build-arg EXTRA_PACKAGES=` builds the CPU-only image
# (CPU onnxruntime, ~2.5 GB smaller; deploy/compose.cpu.yml does that).
#   docker build -f deploy/inference.Dockerfile -t lipsync-inference:0.1.0 .
# (from the repository root; `make images` builds every image).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS requirements
ARG EXTRA=inference-gpu
WORKDIR /src
COPY pyproject.toml deploy/image_requirements.py ./
RUN python3 image_requirements.py extra "${EXTRA}" pyproject.toml >requirements.txt \
 && python3 image_requirements.py build pyproject.toml >build-requirements.txt

# The dependencies: a stage (and an image layer) of their own.
FROM ${BASE_IMAGE} AS deps
# onnxruntime-gpu's extras bring CUDA and cuDNN (pinned by deploy/cuda-constraints.txt).
ARG EXTRA_PACKAGES="onnxruntime-gpu[cuda,cudnn]"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/build_venv.sh deploy/constraints.txt deploy/cuda-constraints.txt deploy/
COPY --from=requirements /src/requirements.txt /src/build-requirements.txt deploy/
RUN set -f; sh deploy/build_venv.sh deps ${EXTRA_PACKAGES}

# The project itself, into /opt/app.
FROM deps AS builder
COPY . .
RUN sh deploy/build_venv.sh project

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 lipsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lipsync
COPY --from=deps /opt/venv /opt/venv
# CUDA/cuDNN from the wheels on the loader's path (nothing to add in the CPU-only image).
RUN if [ -s /opt/venv/nvidia-ld.conf ]; then \
      cp /opt/venv/nvidia-ld.conf /etc/ld.so.conf.d/zz-lipsync-nvidia.conf && ldconfig; \
    fi
COPY --from=builder /opt/app /opt/app
COPY deploy/healthcheck.py /opt/lipsync/healthcheck.py
COPY deploy/image-config.yaml /opt/lipsync/config.yaml
# NUMBA_CACHE_DIR: librosa's numba functions cache there; the root filesystem may be
# read-only (Kubernetes mounts an emptyDir on /tmp).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    LIPSYNC_CONFIG=/opt/lipsync/config.yaml NUMBA_CACHE_DIR=/tmp/numba-cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051
# start-period: loading every avatar's networks (and their float16 conversion on CUDA).
HEALTHCHECK --interval=10s --timeout=6s --start-period=180s --retries=3 \
  CMD ["python", "/opt/lipsync/healthcheck.py", "inference"]
CMD ["python", "-m", "inference_service"]
