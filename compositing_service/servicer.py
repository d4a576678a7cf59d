"""gRPC transport of the compositing service (the port clients use): protocol messages to
domain values and back, and one mapping of errors to what the caller sees. Each RPC reads
as: decode (request_checks.py), call the dataplane, encode.

`InferBatchComposite` reports a failed request the way the replaced system did:
`success=false` with an `error`; the other RPCs use gRPC status codes. The work is done by
the dataplane (InferBatchComposite), the streaming session (StreamComposite; the open
streams are counted and drained by `streaming.OpenStreams`) and the model admin (the
rest). server.py builds and starts the server.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator

import grpc

from compositing_service.admin import ModelAdmin
from compositing_service.compositor import Compositor
from compositing_service.dataplane import BatchDataplane, BatchResult, CallerGone
from compositing_service.frames import FrameStore
from compositing_service.inference_client import DeadlineError, InferenceClient
from compositing_service.request_checks import batch_request
from compositing_service.service_metrics import CompositingMetrics, pace_events
from compositing_service.streaming import (
    OpenStreams,
    StreamError,
    StreamsClosed,
    StreamSession,
    in_context_thread,
)
from compositing_service.video_encoder import EncoderError, H264Encoder
from lipsync.avatars.package import AvatarError, check_model_id
from lipsync.config import Config
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.errors import rpc_error_message
from lipsync.serving.admission import Admission, Overloaded, RateLimitedLog
from lipsync.serving.observability import note_status
from lipsync.serving.status_codes import abort, domain_status

log = logging.getLogger(__name__)


class CompositingServicer(cpb_grpc.CompositingServiceServicer):
    def __init__(
        self,
        cfg: Config,
        admin: ModelAdmin,
        dataplane: BatchDataplane,
        frames: FrameStore,
        inference: InferenceClient,
        compositor: Compositor,
        metrics: CompositingMetrics | None = None,
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
        a = cfg.compositing.admission
        self.admission = Admission(
            "the compositing service", a.max_inflight_frames, a.max_inflight_bytes, a.retry_after_ms
        )
        self.streams = OpenStreams(cfg.compositing.stream.max_sessions, a.retry_after_ms)
        self._internal_errors = RateLimitedLog(log)

    # -- errors: one mapping for every RPC ---------------------------------------------
    def status_of(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status code and message a caller gets for `exc`."""
        status = domain_status(exc)
        if status is not None:
            return status
        if isinstance(exc, StreamError):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, StreamsClosed):
            return grpc.StatusCode.UNAVAILABLE, str(exc)
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
    def InferBatchComposite(self, request, context):
        t_start = time.perf_counter()
        try:
            # admission first: a request past the bound costs nothing more
            with self.admission.admit(max(1, request.batch_size), request.ByteSize()):
                req = batch_request(
                    request, self.cfg.limits, _deadline(context), alive=context.is_active
                )
                result = self.dataplane.render(req)
        except Overloaded as exc:
            self._abort(context, exc)
        except Exception as exc:
            code, message = self.status_of(exc)
            note_status(code)  # counted under its code (lipsync_requests_total)
            return cpb.CompositeBatchResponse(success=False, error=message)
        return _batch_response(result, (time.perf_counter() - t_start) * 1e3)

    # -- StreamComposite ----------------------------------------------------------------
    def StreamComposite(self, request_iterator, context):
        """Bidirectional stream: see compositing_service/streaming/ and docs/STREAMING.md.
        Counted (`OpenStreams.enter`) before its first message is read."""
        try:
            self.streams.enter()
        except Exception as exc:
            self._abort(context, exc)
        try:
            try:
                first = next(request_iterator)
            except StopIteration:
                return
            if first.WhichOneof("msg") != "start":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
            yield from self._stream(first.start, request_iterator, context)
        finally:
            self.streams.leave()

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
        with self.streams.running(session):
            # Accepted: the headers tell the caller now (the gateway answers "started" then).
            context.send_initial_metadata((("lipsync-stream", "accepted"),))
            # in a copy of this RPC's context, as the session's own threads: its log lines
            # carry the request and stream ids
            in_context_thread(session.feed, requests, name="stream-reader").start()
            try:
                yield from session.frames()
            except Exception as exc:
                self._abort(context, exc)

    # -- shutdown (RunningService.stop) -------------------------------------------------
    def drain(self) -> None:
        """Shutdown begins, before the server's grace period: new streams and batches are
        refused, realtime streams end cleanly (`OpenStreams.drain`); offline streams and
        in-flight batches go on until they finish or the grace period ends."""
        self.streams.drain()
        self.admission.close()

    def idle(self) -> bool:
        """No stream open and no batch in progress (shutdown waits for this)."""
        return self.streams.count == 0 and self.admission.idle()

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


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline on time.monotonic()'s clock (None: it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _batch_response(result: BatchResult, total_ms: float) -> cpb.CompositeBatchResponse:
    stages = result.stages_ms
    return cpb.CompositeBatchResponse(
        success=True,
        composited_frames=result.frames,
        gpu_id=result.gpu_id,
        inference_time_ms=stages.get("inference", 0.0),
        composite_time_ms=stages.get("crop", 0.0) + stages.get("paste_jpeg", 0.0),
        total_time_ms=total_ms,
        stage_times_ms=stages,
        background_frame_indices=result.background_indices,
    )
