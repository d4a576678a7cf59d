# GPU inference service (port 50051). onnxruntime-gpu 1.31 is built for CUDA 13 + cuDNN 9.
# Build from the repository root: docker build -f deploy/inference.Dockerfile -t lipsync-inference .
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lipsync lipsync
COPY inference_service inference_service
COPY compositing_service compositing_service
COPY shared_proto shared_proto
COPY scripts scripts
RUN pip install --no-cache-dir ".[gpu]" grpcio-tools \
    && python scripts/gen_proto.py && pip uninstall -y grpcio-tools
ENV AVATARS_DIR=/avatars
EXPOSE 50051
CMD ["python", "-m", "inference_service"]
