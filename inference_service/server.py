"""gRPC transport of the inference service: decodes requests into arrays, calls the
engine, encodes the mouth regions. Errors become gRPC status codes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from inference_service.audio import AudioError, decode_pcm
from inference_service.engine import InferenceEngine, RequestError
from inference_service.registry import CapacityError
from inference_service.sessions import NetworkSignatureError
from lipsync import __version__
from lipsync.avatar_package import AvatarError, UnknownModelError, check_model_id
from lipsync.config import Config
from lipsync.grpc_util import add_health, bind, create_server
from lipsync.infer_wire import InferReply, add_inference_servicer
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.visual import mouth_to_uint8

log = logging.getLogger(__name__)

SERVICE_NAME = "lipsync.inference.InferenceService"
ENCODINGS = {cpb.PCM_F32LE: "f32le", cpb.PCM_S16LE: "s16le"}
CROP_BYTES = 320 * 320 * 3
VISUAL_BYTES = 6 * 320 * 320 * 4
BLOCK_BYTES = 32 * 16 * 16 * 4


def encode_mouths(mouths: np.ndarray, output_type: int) -> np.ndarray:
    """[B,3,320,320] float32 -> a C-contiguous array in the requested wire encoding.

    FLOAT32/FLOAT16 keep the layout; UINT8 is trunc(255 x) as HWC [B,320,320,3], exactly
    what the reference pastes. The reply is serialized from the array's memory
    (lipsync/infer_wire.py).
    """
    if output_type == ipb.FLOAT16:
        return mouths.astype(np.float16)
    if output_type == ipb.UINT8:
        return mouth_to_uint8(mouths)
    return np.ascontiguousarray(mouths, np.float32)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message: str) -> _Abort:
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)


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

    # -- request decoding ------------------------------------------------------------
    def _clip(self, clip: ipb.AudioClip) -> np.ndarray:
        enc = ENCODINGS.get(clip.encoding)
        if enc is None:
            raise _bad(f"unknown audio encoding {clip.encoding}")
        if clip.sample_offset and clip.sample_rate not in (0, 16000):
            raise _bad("sample_offset needs 16 kHz audio")
        try:
            return decode_pcm(
                clip.pcm, enc, clip.sample_rate, max_seconds=self.cfg.limits.max_audio_seconds
            )
        except AudioError as exc:
            raise _bad(str(exc)) from exc

    def _decode(self, req: ipb.InferRequest) -> DecodedInfer:
        b = req.batch_size
        limit = self.cfg.limits.max_batch_size
        if not 1 <= b <= limit:
            raise _bad(f"batch_size must be between 1 and {limit}, got {b}")
        if req.clip_frame_offset < 0:
            raise _bad("clip_frame_offset must be >= 0")
        face_crops = visual = clip = features = None
        which = req.WhichOneof("visual")
        # each read of a protobuf bytes field copies it: read each once
        if which == "face_crops":
            data = req.face_crops
            if len(data) != b * CROP_BYTES:
                raise _bad(
                    f"face_crops has {len(data)} bytes, expected {b * CROP_BYTES} "
                    f"(uint8 [{b},320,320,3])"
                )
            face_crops = np.frombuffer(data, np.uint8).reshape(b, 320, 320, 3)
        elif which == "visual_input":
            data = req.visual_input
            if len(data) != b * VISUAL_BYTES:
                raise _bad(
                    f"visual_input has {len(data)} bytes, expected "
                    f"{b * VISUAL_BYTES} (float32 [{b},6,320,320])"
                )
            visual = np.frombuffer(data, np.float32).reshape(b, 6, 320, 320)
        else:
            raise _bad("a visual input is required (face_crops or visual_input)")
        which = req.WhichOneof("audio")
        if which == "clip":
            clip = self._clip(req.clip)
        elif which == "audio_features":
            data = req.audio_features
            if len(data) not in (BLOCK_BYTES, b * BLOCK_BYTES):
                raise _bad(
                    f"audio_features has {len(data)} bytes, expected {b * BLOCK_BYTES} (float32 "
                    f"[{b},32,16,16]) or {BLOCK_BYTES} (one [32,16,16] block)"
                )
            features = np.frombuffer(data, np.float32).reshape(-1, 32, 16, 16)
            if not np.all(np.isfinite(features)):
                raise _bad("audio_features contains NaN or infinite values")
        else:
            raise _bad("audio is required (clip or audio_features)")
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
        try:
            check_model_id(model_id)
            self.engine.catalog.get(model_id)
        except UnknownModelError as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        return model_id

    def _guard(self, context: grpc.ServicerContext, fn, *args):  # type: ignore[no-untyped-def]
        """Run fn; map expected errors to status codes, log unexpected ones."""
        try:
            return fn(*args)
        except _Abort as exc:
            context.abort(exc.code, exc.message)
        except UnknownModelError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (RequestError, AudioError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CapacityError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (AvatarError, NetworkSignatureError, FileNotFoundError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model cannot be loaded: {exc}")
        except MemoryError:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory")
        except Exception as exc:
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    # -- RPCs --------------------------------------------------------------------------
    def Infer(self, request, context):
        return self._guard(context, self._infer, request)

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

    def ComputeAudioFeatures(self, request, context):
        return self._guard(context, self._features, request)

    def _features(self, request: ipb.AudioFeaturesRequest) -> ipb.AudioFeaturesResponse:
        self._model_id(request.model_id)
        clip = self._clip(request.clip)
        blocks, timings = self.engine.clip_features(request.model_id, clip)
        return ipb.AudioFeaturesResponse(
            features=blocks.tobytes(), frame_count=len(blocks), stage_times_ms=timings.ms
        )

    def ListModels(self, request, context):
        return self._guard(context, self._list)

    def _list(self) -> cpb.ListModelsResponse:
        self.engine.catalog.rescan()
        loaded = set(self.engine.registry.loaded_ids())
        return cpb.ListModelsResponse(
            models=[
                cpb.ModelInfo(model_id=name, loaded=name in loaded)
                for name in self.engine.catalog.names()
            ]
        )

    def LoadModel(self, request, context):
        return self._guard(context, self._load, request)

    def _load(self, request: cpb.LoadModelRequest) -> cpb.LoadModelResponse:
        self._model_id(request.model_id)
        t0 = time.perf_counter()
        self.engine.registry.load(request.model_id)
        return cpb.LoadModelResponse(success=True, load_time_ms=(time.perf_counter() - t0) * 1e3)

    def UnloadModel(self, request, context):
        return self._guard(context, self._unload, request)

    def _unload(self, request: cpb.UnloadModelRequest) -> cpb.UnloadModelResponse:
        self._model_id(request.model_id)
        if not self.engine.registry.unload(request.model_id):
            return cpb.UnloadModelResponse(success=False, error=f"{request.model_id} is not loaded")
        return cpb.UnloadModelResponse(success=True)

    def GetModelStats(self, request, context):
        return self._guard(context, self._stats, request)

    def _stats(self, request: cpb.GetModelStatsRequest) -> cpb.GetModelStatsResponse:
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
                cpb.ModelStats(
                    model_id=mid,
                    loaded=e is not None,
                    request_count=u.requests if u else 0,
                    frame_count=u.frames if u else 0,
                    total_inference_ms=u.total_ms if u else 0.0,
                    avg_ms_per_frame=(u.total_ms / u.frames) if u and u.frames else 0.0,
                    memory_bytes=e.model.nbytes if e else 0,
                    last_used_unix=u.last_used if u else 0.0,
                    load_time_ms=u.load_ms if u else 0.0,
                    execution_provider=e.model.provider if e else "",
                )
            )
        return cpb.GetModelStatsResponse(
            stats=stats,
            loaded_models=len(snap.loaded),
            max_models=reg.max_models,
            loaded_bytes=snap.loaded_bytes,
            max_bytes=reg.max_bytes,
        )


@dataclass
class RunningInference:
    server: grpc.Server
    port: int
    engine: InferenceEngine

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()
        self.engine.close()


def start(
    cfg: Config, port: int | None = None, engine: InferenceEngine | None = None
) -> RunningInference:
    """Start the inference service (non-blocking). `port=0` binds a free port."""
    engine = engine or InferenceEngine(cfg)
    server = create_server(cfg.inference.max_workers, cfg.limits.max_message_bytes)
    add_inference_servicer(InferenceServicer(engine, cfg), server)
    add_health(server, [SERVICE_NAME])
    bound = bind(server, cfg.inference.host, cfg.inference.port if port is None else port)
    server.start()
    engine.registry.start_idle_reaper()
    log.info("inference service %s listening on %s:%d", __version__, cfg.inference.host, bound)
    return RunningInference(server, bound, engine)
