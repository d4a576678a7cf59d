# CPU compositing service (port 50052, the port clients use). No ONNX Runtime needed.
# Build from the repository root: docker build -f deploy/compositing.Dockerfile -t lipsync-compositing .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lipsync lipsync
COPY inference_service inference_service
COPY compositing_service compositing_service
COPY shared_proto shared_proto
COPY scripts scripts
RUN pip install --no-cache-dir . grpcio-tools \
    && python scripts/gen_proto.py && pip uninstall -y grpcio-tools
ENV AVATARS_DIR=/avatars INFERENCE_ADDRESS=inference:50051
EXPOSE 50052
CMD ["python", "-m", "compositing_service"]
