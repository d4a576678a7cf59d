"""gRPC transport of the compositing service (the port clients use).

`InferBatchComposite` reports bad requests the way the replaced system did:
`success=false` with an `error`; the other RPCs use gRPC status codes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from compositing_service.background_cache import BackgroundCache
from compositing_service.compositor import Compositor
from compositing_service.inference_client import InferenceClient, Mouths
from compositing_service.streaming import StreamError, StreamSession
from lipsync import __version__
from lipsync.avatar_package import AvatarCatalog, AvatarError, UnknownModelError, check_model_id
from lipsync.config import Config
from lipsync.grpc_util import add_health, bind, create_server
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.proto import inference_pb2 as ipb

log = logging.getLogger(__name__)

SERVICE_NAME = "compositing.CompositingService"
VISUAL_BYTES = 6 * 320 * 320 * 4
BLOCK_BYTES = 32 * 16 * 16 * 4
SAMPLE_BYTES = {cpb.PCM_F32LE: 4, cpb.PCM_S16LE: 2}


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class _BatchInput:
    """A validated InferBatchComposite request's inputs, each field read once."""

    model_id: str
    clip_frame_offset: int
    visual: bytes | None  # float32 [B,6,320,320] from the client; None: the avatar's crops
    clip: ipb.AudioClip | None
    features: bytes  # float32 audio blocks when there is no clip


def _rpc_message(exc: grpc.RpcError, address: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"inference service unavailable at {address}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"inference service did not answer in time ({address})"
    return details or str(code)


class CompositingServicer(cpb_grpc.CompositingServiceServicer):
    def __init__(
        self,
        cfg: Config,
        catalog: AvatarCatalog,
        cache: BackgroundCache,
        inference: InferenceClient,
        compositor: Compositor,
    ):
        self.cfg = cfg
        self.catalog = catalog
        self.cache = cache
        self.inference = inference
        self.compositor = compositor
        self._streams = 0
        self._streams_lock = threading.Lock()
        # Inference calls of batch chunks (they wait on the network, not the CPU).
        self._chunks = ThreadPoolExecutor(
            max_workers=2 * cfg.compositing.max_workers, thread_name_prefix="infer-chunk"
        )

    # -- InferBatchComposite ------------------------------------------------------------
    def _request_to_infer(self, req: cpb.CompositeBatchRequest) -> _BatchInput:
        """Validate what can be checked here and hold the request's inputs for the chunks.

        Each bytes field is read once (every read of a protobuf bytes field copies it).
        """
        b = req.batch_size
        limit = self.cfg.limits.max_batch_size
        if not 1 <= b <= limit:
            raise BadRequest(f"batch_size must be between 1 and {limit}, got {b}")
        if req.clip_frame_offset < 0:
            raise BadRequest("clip_frame_offset must be >= 0")
        visual = req.visual_frames or None
        if visual is not None and len(visual) != b * VISUAL_BYTES:
            raise BadRequest(
                f"visual_frames has {len(visual)} bytes; batch_size {b} needs "
                f"{b * VISUAL_BYTES} (float32 [{b},6,320,320])"
            )
        pcm, features = req.raw_audio, req.audio_features
        clip = None
        if pcm and features:
            raise BadRequest("send either raw_audio or audio_features, not both")
        if pcm:
            size = SAMPLE_BYTES.get(req.audio_encoding)
            if size is None:
                raise BadRequest(f"unknown audio_encoding {req.audio_encoding}")
            if len(pcm) % size:
                raise BadRequest(f"raw_audio has {len(pcm)} bytes, not a multiple of {size}")
            clip = ipb.AudioClip(pcm=pcm, sample_rate=req.sample_rate, encoding=req.audio_encoding)
        elif features:
            n = len(features)
            if n not in (BLOCK_BYTES, b * BLOCK_BYTES):
                raise BadRequest(
                    f"audio_features has {n} bytes; expected {b * BLOCK_BYTES} (float32 "
                    f"[{b},32,16,16]) or {BLOCK_BYTES} (one [32,16,16] block for every frame)"
                )
        else:
            raise BadRequest("no audio: set raw_audio (PCM) or audio_features")
        return _BatchInput(req.model_id, req.clip_frame_offset, visual, clip, features)

    def InferBatchComposite(self, request, context):
        t_start = time.perf_counter()
        try:
            return self._composite(request, t_start)
        except (BadRequest, UnknownModelError, AvatarError) as exc:
            return cpb.CompositeBatchResponse(success=False, error=str(exc))
        except grpc.RpcError as exc:
            return cpb.CompositeBatchResponse(
                success=False, error=_rpc_message(exc, self.inference.address)
            )
        except MemoryError:
            return cpb.CompositeBatchResponse(success=False, error="out of memory")
        except Exception as exc:
            log.exception("InferBatchComposite failed")
            return cpb.CompositeBatchResponse(
                success=False, error=f"internal error: {type(exc).__name__}: {exc}"
            )

    @staticmethod
    def _chunk_request(inp: _BatchInput, k0: int, k1: int) -> ipb.InferRequest:
        """The inference request for frames k0..k1-1 of a validated batch request."""
        req = ipb.InferRequest(
            model_id=inp.model_id, batch_size=k1 - k0, clip_frame_offset=inp.clip_frame_offset + k0
        )
        if inp.visual is not None:
            req.visual_input = inp.visual[k0 * VISUAL_BYTES : k1 * VISUAL_BYTES]
        if inp.clip is not None:
            req.clip.CopyFrom(inp.clip)
        elif len(inp.features) == BLOCK_BYTES:
            req.audio_features = inp.features
        else:
            req.audio_features = inp.features[k0 * BLOCK_BYTES : k1 * BLOCK_BYTES]
        return req

    def _composite(
        self, request: cpb.CompositeBatchRequest, t_start: float
    ) -> cpb.CompositeBatchResponse:
        """Crop, infer and paste in chunks of `compositing.inference_chunk` frames, with
        the next chunk's inference running while this one is pasted and encoded."""
        model_id = check_model_id(request.model_id)
        inp = self._request_to_infer(request)
        own_crops = inp.visual is None
        stages: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        avatar = self.cache.get(model_id)
        stages["background_cache"] = (time.perf_counter() - t0) * 1e3
        indices = self.compositor.background_indices(
            avatar, request.start_frame_idx, request.batch_size
        )
        step = max(1, self.cfg.compositing.inference_chunk)
        bounds = [(k, min(k + step, len(indices))) for k in range(0, len(indices), step)]

        def infer(k0: int, k1: int) -> tuple[list | None, Mouths, float, float]:
            t = time.perf_counter()
            req = self._chunk_request(inp, k0, k1)
            crops = None
            if own_crops:
                batch = self.compositor.crops(avatar, indices[k0:k1])
                req.face_crops = batch.inner.tobytes()
                crops = batch.crops
            t_inf = time.perf_counter()
            mouths = self.inference.infer(req)
            return crops, mouths, (t_inf - t) * 1e3, (time.perf_counter() - t_inf) * 1e3

        frames: list[bytes] = []
        pending = [self._chunks.submit(infer, *b) for b in bounds[:2]]
        gpu_id = -1
        try:
            for n, (k0, k1) in enumerate(bounds):
                crops, mouths, crop_ms, inference_ms = pending[n].result()
                if n + 2 < len(bounds):
                    pending.append(self._chunks.submit(infer, *bounds[n + 2]))
                stages["crop"] += crop_ms
                stages["inference"] += inference_ms
                for k, v in mouths.stage_times_ms.items():
                    stages[f"inference.{k}"] += v
                remote = sum(v for k, v in mouths.stage_times_ms.items() if k != "model_load")
                stages["transfer"] += max(0.0, inference_ms - remote)
                gpu_id = mouths.gpu_id
                t = time.perf_counter()
                frames += self.compositor.composite(avatar, indices[k0:k1], mouths.pixels, crops)
                stages["paste_jpeg"] += (time.perf_counter() - t) * 1e3
        finally:
            for f in pending:
                f.cancel()
        return cpb.CompositeBatchResponse(
            success=True,
            composited_frames=frames,
            gpu_id=gpu_id,
            inference_time_ms=stages["inference"],
            composite_time_ms=stages["crop"] + stages["paste_jpeg"],
            total_time_ms=(time.perf_counter() - t_start) * 1e3,
            stage_times_ms=stages,
            background_frame_indices=indices,
        )

    # -- the rest ----------------------------------------------------------------------
    def Health(self, request, context):
        inference_ok = self.inference.healthy()
        loaded = max_models = 0
        if inference_ok:
            try:
                stats = self.inference.model_stats(timeout_s=2.0)
                loaded, max_models = stats.loaded_models, stats.max_models
            except grpc.RpcError:
                inference_ok = False
        return cpb.HealthResponse(
            healthy=True,
            loaded_models=loaded,
            max_models=max_models,
            inference_server_url=self.inference.address,
            inference_server_healthy=inference_ok,
            version=__version__,
        )

    def _abort_rpc(self, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, UnknownModelError):
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        if isinstance(exc, AvatarError):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if isinstance(exc, grpc.RpcError):
            context.abort(exc.code(), _rpc_message(exc, self.inference.address))
        log.exception("RPC failed")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    def ListModels(self, request, context):
        try:
            self.catalog.rescan()
            try:
                loaded = {m.model_id for m in self.inference.list_models().models if m.loaded}
            except grpc.RpcError:
                loaded = set()
            out = []
            for name in self.catalog.names():
                info = cpb.ModelInfo(model_id=name, loaded=name in loaded)
                cached = self.cache.peek(name)
                if cached is not None:
                    w, h = cached.size
                    info.frames_cached = True
                    info.frame_count, info.frame_width, info.frame_height = cached.count, w, h
                    info.fps = cached.fps
                else:
                    info.fps = self.catalog.get(name).fps
                out.append(info)
            return cpb.ListModelsResponse(models=out)
        except Exception as exc:
            self._abort_rpc(context, exc)

    def _known(self, model_id: str) -> str:
        check_model_id(model_id)
        self.catalog.get(model_id)
        return model_id

    def LoadModel(self, request, context):
        try:
            t0 = time.perf_counter()
            model_id = self._known(request.model_id)
            self.cache.get(model_id)
            resp = self.inference.load_model(model_id)
            resp.load_time_ms = (time.perf_counter() - t0) * 1e3
            return resp
        except Exception as exc:
            self._abort_rpc(context, exc)

    def UnloadModel(self, request, context):
        try:
            model_id = self._known(request.model_id)
            dropped = self.cache.drop(model_id)
            resp = self.inference.unload_model(model_id)
            if dropped and not resp.success:
                return cpb.UnloadModelResponse(success=True)
            return resp
        except Exception as exc:
            self._abort_rpc(context, exc)

    def StreamComposite(self, request_iterator, context):
        """Bidirectional stream: see compositing_service/streaming.py and docs/STREAMING.md."""
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if first.WhichOneof("msg") != "start":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
        start = first.start
        with self._streams_lock:
            if self._streams >= self.cfg.compositing.stream.max_sessions:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
            self._streams += 1
        try:
            try:
                model_id = check_model_id(start.model_id)
                avatar = self.cache.get(model_id)
                encoder = self.compositor.jpeg
                session = StreamSession(
                    start,
                    avatar,
                    self.inference,
                    self.compositor,
                    self.cfg.compositing.stream,
                    lambda i: avatar.encoded(i, encoder).data,
                )
            except UnknownModelError as exc:
                context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            except (StreamError, AvatarError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            context.add_callback(session.cancel)
            reader = threading.Thread(
                target=session.feed, args=(request_iterator,), name="stream-reader", daemon=True
            )
            reader.start()
            try:
                yield from session.frames()
            except StreamError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except grpc.RpcError as exc:
                context.abort(exc.code(), _rpc_message(exc, self.inference.address))
            finally:
                session.cancel()
        finally:
            with self._streams_lock:
                self._streams -= 1

    def GetModelStats(self, request, context):
        try:
            if request.model_id:
                self._known(request.model_id)
            return self.inference.model_stats(request.model_id)
        except Exception as exc:
            self._abort_rpc(context, exc)


@dataclass
class RunningCompositing:
    server: grpc.Server
    port: int
    servicer: CompositingServicer

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()
        self.close()

    def close(self) -> None:
        """Release the inference channel and worker threads (after the server stopped)."""
        self.servicer.inference.close()
        self.servicer.compositor.close()
        self.servicer._chunks.shutdown(wait=False, cancel_futures=True)


def start(cfg: Config, port: int | None = None, preload: bool = True) -> RunningCompositing:
    """Start the compositing service (non-blocking). `port=0` binds a free port."""
    c = cfg.compositing
    catalog = AvatarCatalog(cfg.avatars_path)
    cache = BackgroundCache(catalog, c.frame_cache.max_avatars, c.frame_cache.max_bytes)
    inference = InferenceClient(
        c.inference_address, cfg.limits.max_message_bytes, c.inference_timeout_s, c.transfer_dtype
    )
    servicer = CompositingServicer(
        cfg, catalog, cache, inference, Compositor(c.jpeg_quality, c.workers)
    )
    server = create_server(c.max_workers, cfg.limits.max_message_bytes)
    cpb_grpc.add_CompositingServiceServicer_to_server(servicer, server)
    add_health(server, [SERVICE_NAME])
    bound = bind(server, c.host, c.port if port is None else port)
    server.start()
    if preload:
        threading.Thread(
            target=cache.preload, args=(c.frame_cache.preload,), name="frame-preload", daemon=True
        ).start()
    log.info(
        "compositing service %s listening on %s:%d (inference at %s)",
        __version__,
        c.host,
        bound,
        c.inference_address,
    )
    return RunningCompositing(server, bound, servicer)
