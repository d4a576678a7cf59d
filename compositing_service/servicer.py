"""gRPC transport of the compositing service (the port clients use): protocol messages to
domain values and back, and one mapping of errors to what the caller sees.

`InferBatchComposite` reports a failed request the way the replaced system did:
`success=false` with an `error`; the other RPCs use gRPC status codes. The work is done by
the dataplane (InferBatchComposite), the streaming session (StreamComposite) and the
model admin (the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from compositing_service import security
from compositing_service.admin import ModelAdmin
from compositing_service.compositor import Compositor
from compositing_service.dataplane import BatchDataplane, BatchRequest, CallerGone
from compositing_service.endpoints import is_multi_target
from compositing_service.frames import FrameStore
from compositing_service.inference_client import DeadlineError, InferenceClient
from compositing_service.observe import observe_frames, pace_events
from compositing_service.routing import connect_inference
from compositing_service.streaming import StreamError, StreamSession, in_context_thread
from compositing_service.video_encoder import EncoderError, H264Encoder, choose_encoder
from lipsync import __version__
from lipsync.admission import Admission, HealthWatcher, Overloaded, RateLimitedLog, set_health
from lipsync.avatar_package import AvatarCatalog, AvatarError, check_model_id
from lipsync.config import Config
from lipsync.core.audio import decode_pcm
from lipsync.core.tensors import VISUAL_BYTES
from lipsync.limits import (
    RequestError,
    check_batch_size,
    check_clip_frame_offset,
    check_feature_bytes,
    check_tensor_bytes,
)
from lipsync.metrics import ServiceMetrics
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.errors import rpc_error_message
from lipsync.rpc.messages import audio_encoding
from lipsync.rpc.observe import Observability, note_status
from lipsync.rpc.serve import RunningService, add_health, bind, create_server
from lipsync.rpc.status import abort, domain_status
from lipsync.rpc.tls import serve_health_port

log = logging.getLogger(__name__)

SERVICE_NAME = "compositing.CompositingService"
# Readiness: the standard health status of SERVICE_NAME turns NOT_SERVING while the
# inference service cannot be reached (and on shutdown); "" stays SERVING while the process
# can answer (liveness): docs/RELIABILITY.md.
READINESS_NAMES = (SERVICE_NAME,)


class CompositingServicer(cpb_grpc.CompositingServiceServicer):
    def __init__(
        self,
        cfg: Config,
        admin: ModelAdmin,
        dataplane: BatchDataplane,
        frames: FrameStore,
        inference: InferenceClient,
        compositor: Compositor,
        metrics: ServiceMetrics | None = None,
        h264_encoder: str | None = None,  # the H.264 encoder chosen at start (None: none)
    ):
        self.cfg = cfg
        self.h264 = (
            functools.partial(H264Encoder, h264_encoder, cfg.compositing.stream.h264)
            if h264_encoder is not None
            else None
        )
        self.metrics = metrics
        self.admin = admin
        self.dataplane = dataplane
        self.frames = frames
        self.inference = inference
        self.compositor = compositor
        self._streams = 0
        self._streams_lock = threading.Lock()
        self._sessions: set[StreamSession] = set()
        self._draining = False
        a = cfg.compositing.admission
        self.admission = Admission(
            "the compositing service", a.max_inflight_frames, a.max_inflight_bytes, a.retry_after_ms
        )
        self._internal_errors = RateLimitedLog(log)

    # -- errors: one mapping for every RPC ---------------------------------------------
    def status_of(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status code and message a caller gets for `exc`."""
        status = domain_status(exc)
        if status is not None:
            return status
        if isinstance(exc, StreamError):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, AvatarError | EncoderError):
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        if isinstance(exc, DeadlineError):
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        if isinstance(exc, CallerGone):
            return grpc.StatusCode.CANCELLED, str(exc)
        if isinstance(exc, grpc.RpcError):
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            return code, rpc_error_message(exc, "inference service", self.inference.address)
        # unexpected: with its traceback, but at most a few per minute
        self._internal_errors.error("internal error", exc)
        return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"

    def _abort(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        code, message = self.status_of(exc)
        if not isinstance(exc, Overloaded):  # expected errors: one line, no traceback
            log.debug("%s: %s", code.name, message)  # (the access log has the call)
        abort(context, exc, code, message)

    # -- InferBatchComposite ------------------------------------------------------------
    def batch_request(self, req: cpb.CompositeBatchRequest) -> BatchRequest:
        """Validate a request and hold its inputs; each bytes field is read once (every
        read of a protobuf bytes field copies it)."""
        model_id = check_model_id(req.model_id)
        b = check_batch_size(req.batch_size, self.cfg.limits.max_batch_size)
        check_clip_frame_offset(req.clip_frame_offset)
        visual = req.visual_frames or None
        if visual is not None:
            check_tensor_bytes(
                "visual_frames", len(visual), b, VISUAL_BYTES, "float32 [B,6,320,320]"
            )
        pcm, features = req.raw_audio, req.audio_features
        samples = None
        if pcm and features:
            raise RequestError("send either raw_audio or audio_features, not both")
        if pcm:
            try:
                encoding = audio_encoding(req.audio_encoding)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            size = 2 if encoding == "s16le" else 4
            if len(pcm) % size:
                raise RequestError(f"raw_audio has {len(pcm)} bytes, not a multiple of {size}")
            # decoded once here (16 kHz float32); each chunk sends only the span it reads
            samples = decode_pcm(
                pcm, encoding, req.sample_rate, max_seconds=self.cfg.limits.max_audio_seconds
            )
            del pcm
        elif features:
            check_feature_bytes("audio_features", len(features), b)
        else:
            raise RequestError("no audio: set raw_audio (PCM) or audio_features")
        if visual is not None:  # checked a slice at a time: no request-sized temporary
            v = np.frombuffer(visual, np.float32)
            step = 1 << 20
            if not all(np.isfinite(v[i : i + step]).all() for i in range(0, len(v), step)):
                raise RequestError("visual_frames contains NaN or infinite values")
        return BatchRequest(
            model_id,
            b,
            req.start_frame_idx,
            req.clip_frame_offset,
            visual,
            None,
            features,
            samples=samples,
        )

    def InferBatchComposite(self, request, context):
        t_start = time.perf_counter()
        try:
            # admission first: a request past the bound costs nothing more
            with self.admission.admit(max(1, request.batch_size), request.ByteSize()):
                req = self.batch_request(request)
                remaining = context.time_remaining()
                if remaining is not None:
                    req = dataclasses.replace(req, deadline=time.monotonic() + remaining)
                req = dataclasses.replace(req, alive=context.is_active)
                result = self.dataplane.render(req)
        except Overloaded as exc:
            self._abort(context, exc)
        except Exception as exc:
            code, message = self.status_of(exc)
            note_status(code)  # counted under its code (lipsync_requests_total)
            return cpb.CompositeBatchResponse(success=False, error=message)
        stages = result.stages_ms
        return cpb.CompositeBatchResponse(
            success=True,
            composited_frames=result.frames,
            gpu_id=result.gpu_id,
            inference_time_ms=stages.get("inference", 0.0),
            composite_time_ms=stages.get("crop", 0.0) + stages.get("paste_jpeg", 0.0),
            total_time_ms=(time.perf_counter() - t_start) * 1e3,
            stage_times_ms=stages,
            background_frame_indices=result.background_indices,
        )

    # -- StreamComposite ----------------------------------------------------------------
    def StreamComposite(self, request_iterator, context):
        """Bidirectional stream: see compositing_service/streaming/ and docs/STREAMING.md.

        Counted before its first message is read, so streams hold at most
        `stream.max_sessions` handler threads (the server has that many more than
        `compositing.max_workers`: unary calls and health checks always find one)."""
        with self._streams_lock:
            if self._draining:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
            if self._streams >= self.cfg.compositing.stream.max_sessions:
                context.set_trailing_metadata(
                    (("retry-after-ms", str(self.cfg.compositing.admission.retry_after_ms)),)
                )
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams")
            self._streams += 1
        try:
            try:
                first = next(request_iterator)
            except StopIteration:
                return
            if first.WhichOneof("msg") != "start":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
            yield from self._stream(first.start, request_iterator, context)
        finally:
            with self._streams_lock:
                self._streams -= 1

    def _stream(
        self, start: cpb.StreamStart, requests: Iterator[cpb.StreamRequest], context
    ) -> Iterator[cpb.StreamFrame]:
        try:
            avatar = self.frames.get(check_model_id(start.model_id))
            encoder = self.compositor.jpeg
            session = StreamSession(
                start,
                avatar,
                self.inference,
                self.compositor,
                self.cfg.compositing.stream,
                lambda i: avatar.encoded(i, encoder).data,
                # realtime: skipped slots and late frames, counted by the pacer
                on_pace=pace_events(self.metrics) if self.metrics is not None else None,
                h264=self.h264,
            )
        except Exception as exc:
            self._abort(context, exc)
        context.add_callback(session.cancel)
        with self._streams_lock:
            self._sessions.add(session)
        # Accepted: the headers tell the caller now (the gateway answers "started" then).
        context.send_initial_metadata((("lipsync-stream", "accepted"),))
        # in a copy of this RPC's context, as the session's own threads: its log lines
        # carry the request and stream ids
        reader = in_context_thread(session.feed, requests, name="stream-reader")
        reader.start()
        try:
            yield from session.frames()
        except Exception as exc:
            self._abort(context, exc)
        finally:
            session.cancel()
            with self._streams_lock:
                self._sessions.discard(session)

    # -- shutdown -----------------------------------------------------------------------
    def drain(self) -> None:
        """Shutdown begins (RunningService.stop, before the server's grace period): new
        streams and batches are refused; realtime streams end cleanly (their input is
        closed: the speech made so far is sent, then the stream ends); offline streams
        and in-flight batches go on until they finish or the grace period ends."""
        with self._streams_lock:
            self._draining = True
            sessions = list(self._sessions)
        self.admission.close()
        for session in sessions:
            if session.realtime:
                session.end()

    def idle(self) -> bool:
        """No stream open and no batch in progress (shutdown waits for this)."""
        with self._streams_lock:
            streams = self._streams
        return streams == 0 and self.admission.idle()

    def stop_streams(self) -> None:
        """After the grace period: every stream still open stops now."""
        with self._streams_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.cancel()

    # -- model admin --------------------------------------------------------------------
    def _admin(self, context: grpc.ServicerContext, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except Exception as exc:
            self._abort(context, exc)

    def Health(self, request, context):
        return self._admin(context, self.admin.health)

    def ListModels(self, request, context):
        return self._admin(context, self.admin.list_models)

    def LoadModel(self, request, context):
        return self._admin(context, self.admin.load, request.model_id)

    def UnloadModel(self, request, context):
        return self._admin(context, self.admin.unload, request.model_id)

    def GetModelStats(self, request, context):
        return self._admin(context, self.admin.stats, request.model_id)


def start(cfg: Config, port: int | None = None, preload: bool = True) -> RunningService:
    """Start the compositing service (non-blocking). `port=0` binds a free port."""
    c = cfg.compositing
    # H.264 streams: the first configured encoder that works here; none is an error now,
    # not a failure of every H.264 stream later
    h264_encoder = choose_encoder(c.stream.h264)
    log.info("H.264 streams use the %s encoder", h264_encoder)
    obs = Observability(cfg, "compositing", c.host, c.metrics_port)
    catalog = AvatarCatalog(cfg.avatars_path)
    fc = c.frame_cache
    frames = FrameStore(catalog, fc.max_avatars, fc.max_bytes, fc.decoded_max_bytes)
    # One address: its client retries a call through a restart (docs/RELIABILITY.md);
    # replicas: the router fails the call over to another replica instead.
    retry_s = 0.0 if is_multi_target(c.inference_address) else c.admission.inference_retry_s
    inference = connect_inference(  # one address, or replicas routed by avatar
        cfg,
        lambda address: InferenceClient(
            address,
            cfg.limits.max_message_bytes,
            c.inference_timeout_s,
            c.transfer_dtype,
            security.inference_credentials(cfg),
            interceptors=[obs.client_interceptor],
            retry_s=retry_s,
        ),
    )
    compositor = Compositor(c.jpeg_quality, c.workers)
    dataplane = BatchDataplane(frames, inference, compositor, c.inference_chunk, 2 * c.max_workers)
    servicer = CompositingServicer(
        cfg,
        ModelAdmin(catalog, frames, inference),
        dataplane,
        frames,
        inference,
        compositor,
        metrics=obs.metrics,
        h264_encoder=h264_encoder,
    )
    # Streams hold a handler thread for their life: they get max_sessions threads of their
    # own (admission counts them), so unary calls and health checks always find one of
    # max_workers; calls past all of them (and a queue as long) are refused at once.
    threads = c.max_workers + c.stream.max_sessions
    server = create_server(
        threads,
        cfg.limits.max_message_bytes,
        interceptors=[*obs.interceptors, *security.interceptors(cfg)],
        maximum_concurrent_rpcs=threads + c.max_workers,
    )
    cpb_grpc.add_CompositingServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE_NAME])
    obs.attach(server, [SERVICE_NAME])
    observe_frames(obs, frames, health_servicer)
    bound = bind(server, c.host, c.port if port is None else port, security.server_credentials(cfg))
    server.start()
    obs.serve()
    health_port = serve_health_port(health_servicer, c.host, c.tls.health_port)
    watcher = None
    if c.admission.health_watch_s > 0:  # readiness follows the inference service's health
        watcher = HealthWatcher(
            lambda: inference.healthy(min(1.0, c.admission.health_watch_s)),
            lambda ok: _readiness_changed(health_servicer, ok, c.inference_address),
            c.admission.health_watch_s,
            name="inference-health-watch",
        ).start()
    if preload:
        threading.Thread(
            target=frames.preload_ids,
            args=(c.frame_cache.preload,),
            name="frame-preload",
            daemon=True,
        ).start()
    log.info(
        "compositing service %s listening on %s:%d (inference at %s)",
        __version__,
        c.host,
        bound,
        c.inference_address,
    )

    def close() -> None:  # after the server stopped
        if watcher is not None:
            watcher.stop()
        servicer.stop_streams()
        if health_port is not None:
            health_port.stop(0)
        inference.close()
        compositor.close()
        dataplane.close()
        obs.close()

    return RunningService(server, bound, health_servicer, servicer, close, obs)


def _readiness_changed(health_servicer, ok: bool, address: str) -> None:  # type: ignore[no-untyped-def]
    if ok:
        log.info("inference service at %s is reachable: ready", address)
    else:
        log.warning("inference service at %s is not reachable: not ready", address)
    set_health(health_servicer, READINESS_NAMES, ok)
