"""The compositing service's typed client of the inference service: domain values in
(face crops as an array, a clip of PCM audio, frame offsets), paste-ready mouths out.
Callers never build protobuf requests."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lipsync.core.tensors import INNER
from lipsync.core.visual import mouth_to_uint8
from lipsync.proto import common_pb2 as common
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.channel import create_channel
from lipsync.rpc.infer_wire import infer_callable
from lipsync.rpc.messages import audio_encoding_value

log = logging.getLogger(__name__)

TRANSFER_TYPES = {"float32": ipb.FLOAT32, "float16": ipb.FLOAT16, "uint8": ipb.UINT8}

# Codes after which the same Infer call is sent again (Infer is idempotent: same inputs,
# same mouths). UNAVAILABLE: the service is restarting or unreachable.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ClipAudio:
    """One clip of mono PCM audio as the inference service takes it.

    `pcm` holds the clip's samples from 16 kHz sample `sample_offset` on (a multiple of
    `lipsync.core.lookahead.TAIL_ALIGN`; then the audio must be 16 kHz), so a stream sends
    only the tail its next frames need; frame numbers stay the whole clip's.
    """

    pcm: bytes
    sample_rate: int = 0  # 0 means 16000
    encoding: str = "f32le"  # or "s16le"
    sample_offset: int = 0


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class InferCall:
    """One Infer call as its callers make it: the mouths of clip frames
    `clip_frame_offset .. + batch_size - 1` of avatar `model_id`. Built by the dataplane
    and the streams' inference stage, passed whole through the router
    (compositing_service/routing.py) to the client that sends it.

    Visual: `face_crops` uint8 [B, 320, 320, 3] (the inner squares of the avatar's
    crops) or `visual_input`, float32 [B, 6, 320, 320] bytes. Audio: `clip`, or
    `audio_features`, float32 [B, 32, 16, 16] or one [32, 16, 16] block, as bytes.
    `deadline` (time.monotonic(); None: the client's own timeout) ends the call, retries
    included, when its caller's time is up (docs/RELIABILITY.md).
    """

    model_id: str
    batch_size: int
    face_crops: np.ndarray | None = None
    visual_input: bytes | None = None
    clip: ClipAudio | None = None
    audio_features: bytes | None = None
    clip_frame_offset: int = 0
    deadline: float | None = None

    def request(self) -> ipb.InferRequest:
        """The call's InferRequest (without the output type: the client sets its own)."""
        req = ipb.InferRequest(
            model_id=self.model_id,
            batch_size=self.batch_size,
            clip_frame_offset=self.clip_frame_offset,
        )
        if self.face_crops is not None:
            req.face_crops = np.ascontiguousarray(self.face_crops, np.uint8).tobytes()
        elif self.visual_input is not None:
            req.visual_input = self.visual_input
        if self.clip is not None:
            req.clip.pcm = self.clip.pcm
            req.clip.sample_rate = self.clip.sample_rate
            req.clip.encoding = audio_encoding_value(self.clip.encoding)
            req.clip.sample_offset = self.clip.sample_offset
        elif self.audio_features is not None:
            req.audio_features = self.audio_features
        return req


def _retry_after_ms(exc: grpc.RpcError) -> int | None:
    """The `retry-after-ms` hint of a RESOURCE_EXHAUSTED refusal (lipsync.serving.admission), or
    None (another code, or no hint: e.g. a model that does not fit is not retried)."""
    try:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
            return None
        hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")  # type: ignore[attr-defined]
        return int(hint) if hint is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


class DeadlineError(TimeoutError):
    """The caller's deadline passed before an inference call could be made."""


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
        return np.frombuffer(payload, np.uint8).reshape(batch, INNER, INNER, 3)
    dtype = np.float16 if output_type == ipb.FLOAT16 else np.float32
    return mouth_to_uint8(np.frombuffer(payload, dtype).reshape(batch, 3, INNER, INNER))


class InferenceClient:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        timeout_s: float,
        transfer: str,
        credentials: grpc.ChannelCredentials | None = None,  # TLS (compositing.inference_tls)
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),  # ids, trace context
        retry_s: float = 0.0,  # retry UNAVAILABLE calls, waiting for the service, this long
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.retries = 0  # calls sent again (tests, docs/RELIABILITY.md)
        self.output_type = TRANSFER_TYPES[transfer]
        self.channel = create_channel(address, max_message_bytes, credentials)
        if interceptors:
            self.channel = grpc.intercept_channel(self.channel, *interceptors)
        self.stub = ipb_grpc.InferenceServiceStub(self.channel)
        self._infer = infer_callable(self.channel)  # the mouths without protobuf's copies
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def infer(self, call: InferCall) -> Mouths:
        """The mouths of one call (see `InferCall`)."""
        return self.call(call.request(), call.deadline)

    def call(self, request: ipb.InferRequest, deadline: float | None = None) -> Mouths:
        """One Infer call of a built request (`infer` builds them), ended by `deadline`
        (time.monotonic(); None: the client's own timeout)."""
        request.output_type = self.output_type
        resp, payload = self._call_with_retry(request, deadline)  # payload: a view
        return Mouths(
            pixels=to_paste_pixels(payload, resp.output_type, resp.batch_size),
            stage_times_ms=dict(resp.stage_times_ms),
            gpu_id=resp.gpu_id,
            provider=resp.execution_provider,
            wire_bytes=len(payload),
        )

    def _call_with_retry(self, request: ipb.InferRequest, deadline: float | None):  # type: ignore[no-untyped-def]
        """Infer, sent again on UNAVAILABLE with backoff (and `wait_for_ready`, so a call
        waits for a restarting service instead of failing at once) while the retry window
        (`retry_s` from the first failure) and the caller's deadline allow."""
        now = time.monotonic()
        end = now + self.timeout_s if deadline is None else min(deadline, now + self.timeout_s)
        retry_until = None
        first_error: grpc.RpcError | None = None
        backoff = 0.05
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise DeadlineError("the caller's deadline passed before the inference call")
            try:
                return self._infer(request, timeout=left, wait_for_ready=retry_until is not None)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if first_error is not None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise first_error from None  # waited for the service; it never came
                hint_ms = _retry_after_ms(exc)  # shed by the service's admission control
                if (code not in RETRY_CODES and hint_ms is None) or self.retry_s <= 0:
                    raise
                now = time.monotonic()
                if retry_until is None:
                    retry_until = min(end, now + self.retry_s)
                    first_error = exc
                if now + backoff >= retry_until:
                    raise
                wait = backoff if hint_ms is None else max(backoff, hint_ms / 1000)
                wait = min(wait * (0.5 + random.random() / 2), max(0.0, retry_until - now))
                log.info("inference call failed (%s); retrying in %.0f ms", code, wait * 1e3)
                self.retries += 1
                time.sleep(wait)
                end = retry_until
                backoff = min(1.0, backoff * 2)

    def healthy(self, timeout_s: float = 1.0) -> bool:
        try:
            resp = self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def list_models(self) -> common.ListModelsResponse:
        return self.stub.ListModels(common.ListModelsRequest(), timeout=self.timeout_s)

    def load_model(self, model_id: str) -> common.LoadModelResponse:
        return self.stub.LoadModel(
            common.LoadModelRequest(model_id=model_id), timeout=self.timeout_s
        )

    def unload_model(self, model_id: str) -> common.UnloadModelResponse:
        return self.stub.UnloadModel(
            common.UnloadModelRequest(model_id=model_id), timeout=self.timeout_s
        )

    def model_stats(
        self, model_id: str = "", timeout_s: float | None = None
    ) -> common.GetModelStatsResponse:
        return self.stub.GetModelStats(
            common.GetModelStatsRequest(model_id=model_id), timeout=timeout_s or self.timeout_s
        )

    def close(self) -> None:
        self.channel.close()
