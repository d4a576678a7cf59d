"""gRPC transport of the inference service: decodes requests into arrays, calls the
engine, encodes the mouth regions. Errors become gRPC status codes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from inference_service.batching import CallerScope, Expired, caller_scope
from inference_service.engine import InferenceEngine
from inference_service.observe import observe_engine, unobserve_engine
from inference_service.sessions import NetworkSignatureError
from lipsync import __version__
from lipsync.admission import Admission, RateLimitedLog
from lipsync.avatar_package import AvatarError, check_model_id
from lipsync.config import Config
from lipsync.core.audio import decode_pcm
from lipsync.core.tensors import FACE_CROP_BYTES, VISUAL_BYTES
from lipsync.core.visual import mouth_to_uint8
from lipsync.limits import (
    RequestError,
    check_batch_size,
    check_clip_frame_offset,
    check_feature_bytes,
    check_tensor_bytes,
)
from lipsync.proto import common_pb2 as common
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.infer_wire import InferReply, add_inference_servicer
from lipsync.rpc.messages import audio_encoding
from lipsync.rpc.observe import Observability
from lipsync.rpc.serve import RunningService, add_health, bind, create_server
from lipsync.rpc.status import abort, domain_status
from lipsync.rpc.tls import serve_health_port, server_credentials_of

log = logging.getLogger(__name__)

SERVICE_NAME = "lipsync.inference.InferenceService"


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


@dataclass
class DecodedInfer:
    model_id: str
    batch: int
    face_crops: np.ndarray | None
    visual: np.ndarray | None
    clip: np.ndarray | None
    features: np.ndarray | None
    offset: int
    sample_offset: int


class InferenceServicer(ipb_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, cfg: Config):
        self.engine = engine
        self.cfg = cfg
        a = cfg.inference.admission
        self.admission = Admission(
            "the inference service", a.max_inflight_frames, a.max_inflight_bytes, a.retry_after_ms
        )
        self._internal_errors = RateLimitedLog(log)

    # -- request decoding ------------------------------------------------------------
    def _clip(self, clip: ipb.AudioClip) -> np.ndarray:
        try:
            enc = audio_encoding(clip.encoding)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        if clip.sample_offset and clip.sample_rate not in (0, 16000):
            raise RequestError("sample_offset needs 16 kHz audio")
        return decode_pcm(
            clip.pcm, enc, clip.sample_rate, max_seconds=self.cfg.limits.max_audio_seconds
        )

    def _decode(self, req: ipb.InferRequest) -> DecodedInfer:
        b = check_batch_size(req.batch_size, self.cfg.limits.max_batch_size)
        check_clip_frame_offset(req.clip_frame_offset)
        face_crops = visual = clip = features = None
        which = req.WhichOneof("visual")
        # each read of a protobuf bytes field copies it: read each once
        if which == "face_crops":
            data = req.face_crops
            check_tensor_bytes("face_crops", len(data), b, FACE_CROP_BYTES, "uint8 [B,320,320,3]")
            face_crops = np.frombuffer(data, np.uint8).reshape(b, 320, 320, 3)
        elif which == "visual_input":
            data = req.visual_input
            check_tensor_bytes("visual_input", len(data), b, VISUAL_BYTES, "float32 [B,6,320,320]")
            visual = np.frombuffer(data, np.float32).reshape(b, 6, 320, 320)
            if not np.isfinite(visual).all():
                raise RequestError("visual_input contains NaN or infinite values")
        else:
            raise RequestError("a visual input is required (face_crops or visual_input)")
        which = req.WhichOneof("audio")
        if which == "clip":
            clip = self._clip(req.clip)
        elif which == "audio_features":
            data = req.audio_features
            check_feature_bytes("audio_features", len(data), b)
            features = np.frombuffer(data, np.float32).reshape(-1, 32, 16, 16)
            if not np.all(np.isfinite(features)):
                raise RequestError("audio_features contains NaN or infinite values")
        else:
            raise RequestError("audio is required (clip or audio_features)")
        return DecodedInfer(
            req.model_id,
            b,
            face_crops,
            visual,
            clip,
            features,
            req.clip_frame_offset,
            req.clip.sample_offset if clip is not None else 0,
        )

    def _model_id(self, model_id: str) -> str:
        """`model_id` if an avatar of that name is served; else UnknownModelError."""
        check_model_id(model_id)
        self.engine.catalog.get(model_id)
        return model_id

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
        d = self._decode(request)
        self._model_id(d.model_id)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        res = self.engine.infer(
            d.model_id,
            d.batch,
            face_crops=d.face_crops,
            visual=d.visual,
            clip=d.clip,
            features=d.features,
            clip_frame_offset=d.offset,
            sample_offset=d.sample_offset,
        )
        t1 = time.perf_counter()
        payload = encode_mouths(res.mouths, request.output_type)
        timings = dict(res.timings.ms)
        timings["decode"] = decode_ms
        timings["encode"] = (time.perf_counter() - t1) * 1000.0
        fields = ipb.InferResponse(
            output_type=request.output_type,
            batch_size=d.batch,
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


def start(
    cfg: Config,
    port: int | None = None,
    engine: InferenceEngine | None = None,
    preload: bool = True,
) -> RunningService:
    """Start the inference service. `port=0` binds a free port. With `preload`, the
    models of `inference.registry.preload` are loaded before the health service says
    SERVING (calls that come earlier are served, loading what they need)."""
    engine = engine or InferenceEngine(cfg)
    obs = Observability(cfg, "inference", cfg.inference.host, cfg.inference.metrics_port)
    server = create_server(
        cfg.inference.max_workers, cfg.limits.max_message_bytes, interceptors=obs.interceptors
    )
    servicer = InferenceServicer(engine, cfg)
    add_inference_servicer(servicer, server)
    health_servicer = add_health(server, [SERVICE_NAME])
    obs.attach(server, [SERVICE_NAME])
    observe_engine(obs, engine, health_servicer)
    tls = cfg.inference.tls  # with client_ca_file: only callers with a certificate it signed
    bound = bind(
        server,
        cfg.inference.host,
        cfg.inference.port if port is None else port,
        server_credentials_of(tls),
    )
    if preload:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    obs.serve()
    health_port = serve_health_port(health_servicer, cfg.inference.host, tls.health_port)
    log.info("inference service %s listening on %s:%d", __version__, cfg.inference.host, bound)
    if preload:
        engine.preload()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("preload done: %d model(s) loaded", len(engine.registry.loaded_ids()))
    engine.registry.start_idle_reaper()

    def close() -> None:  # after the server stopped
        if health_port is not None:
            health_port.stop(0)
        obs.close()
        unobserve_engine(obs, engine)
        engine.close()

    return RunningService(server, bound, health_servicer, servicer, close, obs)
