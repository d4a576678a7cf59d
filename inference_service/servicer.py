"""gRPC transport of the inference service: decodes requests into arrays
(request_checks.py), calls the engine, encodes the mouth regions. Errors become gRPC
status codes. server.py builds and starts the server."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np

from inference_service.batching import CallerScope, Expired, caller_scope
from inference_service.engine import InferenceEngine
from inference_service.request_checks import decode_infer, served_model
from inference_service.sessions import NetworkSignatureError
from lipsync.avatars.package import AvatarError
from lipsync.config import Config
from lipsync.core.visual import mouth_to_uint8
from lipsync.proto import common_pb2 as common
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.infer_wire import InferReply
from lipsync.serving.admission import Admission, RateLimitedLog
from lipsync.serving.status_codes import abort, domain_status

log = logging.getLogger(__name__)


def encode_mouths(mouths: np.ndarray, output_type: int) -> np.ndarray:
    """[B,3,320,320] float32 -> a C-contiguous array in the requested wire encoding.

    FLOAT32/FLOAT16 keep the layout; UINT8 is trunc(255 x) as HWC [B,320,320,3], exactly
    what the reference pastes. The reply is serialized from the array's memory
    (lipsync/rpc/infer_wire.py).
    """
    if output_type == ipb.FLOAT16:
        return mouths.astype(np.float16)
    if output_type == ipb.UINT8:
        return mouth_to_uint8(mouths)
    return np.ascontiguousarray(mouths, np.float32)


class InferenceServicer(ipb_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, cfg: Config):
        self.engine = engine
        self.cfg = cfg
        a = cfg.inference.admission
        self.admission = Admission(
            "the inference service", a.max_inflight_frames, a.max_inflight_bytes, a.retry_after_ms
        )
        self._internal_errors = RateLimitedLog(log)

    def _model_id(self, model_id: str) -> str:
        """`model_id` if an avatar of that name is served; else UnknownModelError."""
        return served_model(self.engine.catalog, model_id)

    def _guard(self, context: grpc.ServicerContext, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn; map expected errors to status codes, log unexpected ones."""
        try:
            return fn(*args)
        except Exception as exc:
            abort(context, exc, *self._status_of(exc))

    def _status_of(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        status = domain_status(exc)
        if status is not None:
            return status
        if isinstance(exc, Expired):
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        if isinstance(exc, AvatarError | NetworkSignatureError | FileNotFoundError):
            return grpc.StatusCode.FAILED_PRECONDITION, f"model cannot be loaded: {exc}"
        self._internal_errors.error("internal error", exc)  # traceback, rate-limited
        return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"

    # -- RPCs --------------------------------------------------------------------------
    def Infer(self, request, context):
        return self._guard(context, self._admitted_infer, request, context)

    def _admitted_infer(self, request: ipb.InferRequest, context) -> InferReply:  # type: ignore[no-untyped-def]
        """Admission (frames in progress), then the request with its caller's deadline
        and liveness in scope: the batcher drops its rows if the caller has gone."""
        with self.admission.admit(max(1, request.batch_size), request.ByteSize()):
            remaining = context.time_remaining()
            scope = CallerScope(
                None if remaining is None else time.monotonic() + remaining, context.is_active
            )
            token = caller_scope.set(scope)
            try:
                return self._infer(request)
            finally:
                caller_scope.reset(token)

    def _infer(self, request: ipb.InferRequest) -> InferReply:
        t0 = time.perf_counter()
        req = decode_infer(request, self.cfg.limits, self.engine.catalog)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        res = self.engine.infer(req)
        t1 = time.perf_counter()
        payload = encode_mouths(res.mouths, request.output_type)
        timings = dict(res.timings.ms)
        timings["decode"] = decode_ms
        timings["encode"] = (time.perf_counter() - t1) * 1000.0
        fields = ipb.InferResponse(
            output_type=request.output_type,
            batch_size=req.batch_size,
            gpu_id=self.cfg.inference.device_id if "CUDA" in res.provider else -1,
            stage_times_ms=timings,
            execution_provider=res.provider,
        )
        return InferReply(fields, payload)

    def ListModels(self, request, context):
        return self._guard(context, self._list)

    def _list(self) -> common.ListModelsResponse:
        self.engine.catalog.rescan()
        loaded = set(self.engine.registry.loaded_ids())
        return common.ListModelsResponse(
            models=[
                common.ModelInfo(model_id=name, loaded=name in loaded)
                for name in self.engine.catalog.names()
            ]
        )

    def LoadModel(self, request, context):
        return self._guard(context, self._load, request)

    def _load(self, request: common.LoadModelRequest) -> common.LoadModelResponse:
        self._model_id(request.model_id)
        t0 = time.perf_counter()
        self.engine.registry.load(request.model_id)
        return common.LoadModelResponse(success=True, load_time_ms=(time.perf_counter() - t0) * 1e3)

    def UnloadModel(self, request, context):
        return self._guard(context, self._unload, request)

    def _unload(self, request: common.UnloadModelRequest) -> common.UnloadModelResponse:
        self._model_id(request.model_id)
        if not self.engine.registry.unload(request.model_id):
            return common.UnloadModelResponse(
                success=False, error=f"{request.model_id} is not loaded"
            )
        return common.UnloadModelResponse(success=True)

    def GetModelStats(self, request, context):
        return self._guard(context, self._stats, request)

    def _stats(self, request: common.GetModelStatsRequest) -> common.GetModelStatsResponse:
        if request.model_id:
            self._model_id(request.model_id)
        snap = self.engine.registry.snapshot()
        reg = self.engine.registry
        ids = [request.model_id] if request.model_id else self.engine.catalog.names()
        stats = []
        for mid in ids:
            u = snap.usage.get(mid)
            e = snap.loaded.get(mid)
            stats.append(
                common.ModelStats(
                    model_id=mid,
                    loaded=e is not None,
                    request_count=u.requests if u else 0,
                    frame_count=u.frames if u else 0,
                    total_inference_ms=u.total_ms if u else 0.0,
                    avg_ms_per_frame=(u.total_ms / u.frames) if u and u.frames else 0.0,
                    memory_bytes=e.model.memory_bytes if e else 0,
                    last_used_unix=u.last_used if u else 0.0,
                    load_time_ms=u.load_ms if u else 0.0,
                    execution_provider=e.model.provider if e else "",
                    unet_precision=e.model.precision if e else "",
                    precision_note=e.model.precision_note if e else "",
                )
            )
        return common.GetModelStatsResponse(
            stats=stats,
            loaded_models=len(snap.loaded),
            max_models=reg.max_models,
            loaded_bytes=snap.loaded_bytes,
            max_bytes=reg.max_bytes,
        )
