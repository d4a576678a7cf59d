"""The compositing service's client of the inference service."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lipsync.grpc_util import create_channel
from lipsync.infer_wire import infer_callable
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.visual import mouth_to_uint8

log = logging.getLogger(__name__)

TRANSFER_TYPES = {"float32": ipb.FLOAT32, "float16": ipb.FLOAT16, "uint8": ipb.UINT8}


@dataclass
class Mouths:
    """Mouth regions ready to paste: uint8 [B, 320, 320, 3] BGR, trunc(255 x)."""

    pixels: np.ndarray
    stage_times_ms: dict[str, float]
    gpu_id: int
    provider: str
    wire_bytes: int


def to_paste_pixels(payload: bytes | memoryview, output_type: int, batch: int) -> np.ndarray:
    """Decode an InferResponse payload into uint8 [B,320,320,3] paste pixels."""
    if output_type == ipb.UINT8:
        return np.frombuffer(payload, np.uint8).reshape(batch, 320, 320, 3)
    dtype = np.float16 if output_type == ipb.FLOAT16 else np.float32
    return mouth_to_uint8(np.frombuffer(payload, dtype).reshape(batch, 3, 320, 320))


class InferenceClient:
    def __init__(self, address: str, max_message_bytes: int, timeout_s: float, transfer: str):
        self.address = address
        self.timeout_s = timeout_s
        self.output_type = TRANSFER_TYPES[transfer]
        self.channel = create_channel(address, max_message_bytes)
        self.stub = ipb_grpc.InferenceServiceStub(self.channel)
        self._infer = infer_callable(self.channel)  # the mouths without protobuf's copies
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def infer(self, request: ipb.InferRequest) -> Mouths:
        request.output_type = self.output_type
        resp, payload = self._infer(request, timeout=self.timeout_s)  # payload: a view
        return Mouths(
            pixels=to_paste_pixels(payload, resp.output_type, resp.batch_size),
            stage_times_ms=dict(resp.stage_times_ms),
            gpu_id=resp.gpu_id,
            provider=resp.execution_provider,
            wire_bytes=len(payload),
        )

    def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            resp = self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def list_models(self) -> cpb.ListModelsResponse:
        return self.stub.ListModels(cpb.ListModelsRequest(), timeout=self.timeout_s)

    def load_model(self, model_id: str) -> cpb.LoadModelResponse:
        return self.stub.LoadModel(cpb.LoadModelRequest(model_id=model_id), timeout=self.timeout_s)

    def unload_model(self, model_id: str) -> cpb.UnloadModelResponse:
        return self.stub.UnloadModel(
            cpb.UnloadModelRequest(model_id=model_id), timeout=self.timeout_s
        )

    def model_stats(
        self, model_id: str = "", timeout_s: float | None = None
    ) -> cpb.GetModelStatsResponse:
        return self.stub.GetModelStats(
            cpb.GetModelStatsRequest(model_id=model_id), timeout=timeout_s or self.timeout_s
        )

    def close(self) -> None:
        self.channel.close()
