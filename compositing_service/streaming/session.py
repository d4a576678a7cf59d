"""A StreamComposite session: the stages wired together.

    reader thread      feed(): requests -> AudioIngest -> clips
    producer thread    Planner.next_batch() -> InferStage.run() -> Handoff(2)
    compositor thread  Handoff -> CompositeStage.run() -> output.put()
    RPC generator      frames(): OfflineSink or RealtimePacer -> StreamFrame

Each stage owns its state; they meet at explicit hand-offs (the `ClipSink` calls, the
bounded `Handoff`, the output's queue) and at the `Schedule` (the timeline both the
planner and the output stage must see). Control travels as events:

- interrupt: a new epoch, told to every stage downstream first (output, composite,
  infer, planner, ingest); each drops what it holds of older epochs, and every batch
  carries the epoch it was planned in, so nothing planned before it can reach the client.
- failure: the first error is kept by the output (the client gets it from `frames`) and
  the planner stops; the pipeline drains and ends.
- cancel: every stage and hand-off stops waiting and returns.

The producer and compositor threads run in a copy of the context `frames` is called in
(and the servicer starts the reader thread so too): the RPC's log ids (request and stream
id, lipsync.serving.logs) tag their log lines, and with tracing on the stream's inference calls
are children of the stream's span. A realtime stream's pacer reports its skipped slots and
late frames to `on_pace` (the service's metrics) and in `pace_counts`.

Video: JPEG frames (the default) are encoded by the compositing stage; an H.264 stream
(`start.video_codec`) gets one encoder of its own (`h264(width, height, fps)`), fed by
the output stage in the order frames are sent, idle frames included; `request_keyframe`
messages reach it from the reader thread. The RPC's generator frees it when it ends.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from compositing_service.compositor import Compositor
from compositing_service.frames import AvatarFrames
from compositing_service.inference_client import InferenceClient
from compositing_service.streaming.composite_stage import CompositeStage
from compositing_service.streaming.handoff import Handoff
from compositing_service.streaming.infer_stage import InferredBatch, InferStage, transient
from compositing_service.streaming.ingest import AudioIngest, StreamError
from compositing_service.streaming.output import (
    FrameMessages,
    OfflineSink,
    PaceCounts,
    RealtimePacer,
    VideoEncoder,
)
from compositing_service.streaming.planner import Planner
from compositing_service.streaming.schedule import Schedule
from lipsync.config import StreamConfig
from lipsync.core.audio import AudioError, check_rate
from lipsync.proto import compositing_pb2 as cpb
from lipsync.rpc.messages import audio_encoding

log = logging.getLogger(__name__)


class H264Stream(VideoEncoder, Protocol):
    """A stream's H.264 encoder (compositing_service/video_encoder.H264Encoder)."""

    def request_keyframe(self) -> None: ...

    def close(self) -> None: ...


# Realtime: how long one inference call may take, retries included, before its speech is
# dropped and the avatar idles (an inference outage must not stall the video): at least
# this, and more where batches take longer to make (a large model on a slow device), so a
# slow but working service is not mistaken for an outage.
REALTIME_CALL_BUDGET_S = 0.5
REALTIME_BUDGET_BATCHES = 3  # ... or this many times a batch's measured production time
# An H.264 stream's made but unsent frames are pictures (2.7 MB at 720p), not JPEGs: its
# output queue holds at most this many bytes of them (and at least two batches).
H264_QUEUE_BYTES = 64 << 20


class StreamSession:
    def __init__(
        self,
        start: cpb.StreamStart,
        avatar: AvatarFrames,
        inference: InferenceClient,
        compositor: Compositor,
        settings: StreamConfig,
        idle_jpeg: Callable[[int], bytes],  # JPEG of background frame i, unmodified
        *,
        clock: Callable[[], float] = time.monotonic,
        on_pace: Callable[[str], None] | None = None,  # realtime: RealtimePacer.on_event
        h264: Callable[[int, int, float], H264Stream] | None = None,  # an encoder per stream
    ):
        try:
            rate = check_rate(start.sample_rate)
            encoding = audio_encoding(start.audio_encoding)
        except (AudioError, ValueError) as exc:
            raise StreamError(str(exc)) from exc
        self.encoder: H264Stream | None = None
        if start.video_codec == cpb.VIDEO_CODEC_H264:
            if h264 is None:
                raise StreamError("this service does not encode H.264")
            self.encoder = h264(*avatar.size, avatar.fps)
        elif start.video_codec != cpb.VIDEO_CODEC_JPEG:
            raise StreamError(f"unknown video_codec {start.video_codec}")
        self.start = start
        self.realtime = start.realtime
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch = 0
        self._cancelled = False
        self._threads: list[threading.Thread] = []

        self.schedule = Schedule(avatar.fps, clock0=clock())
        self.planner = Planner(
            self.schedule,
            realtime=start.realtime,
            max_batch=settings.max_batch,
            jitter_ms=settings.jitter_ms,
            gap_flush_ms=settings.gap_flush_ms,
            clock=clock,
        )
        self.ingest = AudioIngest(
            rate, encoding, self.planner, clock, max_buffered_s=settings.max_buffered_audio_s
        )
        self.inferring = InferStage(
            start.model_id,
            avatar,
            inference,
            compositor,
            start_frame_idx=start.start_frame_idx,
            return_audio=start.return_audio,
            call_budget_s=self._realtime_budget if start.realtime else None,
        )
        self.handoff: Handoff[InferredBatch] = Handoff(2)
        self.compositing = CompositeStage(avatar, compositor, jpeg=self.encoder is None)
        queued = settings.max_queued_frames
        if self.encoder is not None:
            w, h = avatar.size
            bound = max(2 * settings.max_batch, H264_QUEUE_BYTES // (3 * w * h))
            queued = min(queued, bound) if queued else bound
        messages = FrameMessages(
            avatar.fps,
            avatar.count,
            start.start_frame_idx,
            idle_jpeg,
            start.return_audio,
            clock,
            encoder=self.encoder,
            idle_image=(lambda i: avatar.frames[i]) if self.encoder is not None else None,
        )
        self.output: OfflineSink | RealtimePacer = (
            RealtimePacer(
                messages,
                self.schedule,
                clock,
                capacity=queued,
                on_event=on_pace,
            )
            if start.realtime
            else OfflineSink(messages, self.schedule, queued)
        )

    @property
    def pace_counts(self) -> PaceCounts | None:
        """Realtime: the slots skipped and frames sent late so far (None offline)."""
        return self.output.counts if isinstance(self.output, RealtimePacer) else None

    def _realtime_budget(self) -> float:
        return max(REALTIME_CALL_BUDGET_S, REALTIME_BUDGET_BATCHES * self.planner.batch_ms / 1000)

    # -- input (the reader thread) -------------------------------------------------------
    def feed(self, requests: Iterator[cpb.StreamRequest]) -> None:
        """Read the client's messages after `start` until it closes its side."""
        try:
            for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "audio":
                    self.ingest.audio(req.audio)
                elif kind == "end_of_audio":
                    self.ingest.end_of_audio()
                elif kind == "interrupt":
                    self.interrupt()
                elif kind == "request_keyframe":
                    if req.request_keyframe and self.encoder is not None:
                        self.encoder.request_keyframe()
                elif kind == "start":
                    raise StreamError("start may only be the first message")
                if self._cancelled:
                    return
        except StreamError as exc:
            self.fail(exc)
        except Exception as exc:  # the client went away mid-read, ...
            if not self._cancelled:
                self.fail(exc)
        finally:
            self.ingest.close()

    # -- events --------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Drop queued and in-flight speech: the next slot is an idle frame."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            # downstream first: a batch the planner makes in the new epoch must not meet
            # a stage still in the old one
            self.output.interrupt(epoch)
            self.compositing.interrupt(epoch)
            self.inferring.interrupt(epoch)
            self.planner.interrupt(epoch)
            self.ingest.interrupt(epoch)

    def fail(self, exc: BaseException) -> None:
        self.output.fail(exc)
        self.planner.stop()
        self.ingest.stop()

    def end(self) -> None:
        """End cleanly (the service shuts down): nothing more is planned; what is made is
        sent, then the stream ends with OK."""
        self.planner.stop()
        self.ingest.stop()

    def cancel(self) -> None:
        self._cancelled = True
        self.planner.stop()
        self.ingest.stop()
        self.handoff.cancel()
        self.output.cancel()

    # -- production ----------------------------------------------------------------------
    def _produce(self) -> None:
        try:
            while (batch := self.planner.next_batch()) is not None:
                try:
                    inferred = self.inferring.run(batch)
                except Exception as exc:
                    if not (self.realtime and transient(exc)) or self._cancelled:
                        raise
                    # realtime rides out an inference outage: this speech is dropped (as
                    # by an interrupt), the avatar idles, the next audio speaks again
                    log.info("inference call failed (%s): speech dropped", exc)
                    self.interrupt()
                    continue
                if inferred is not None and not self.handoff.put(inferred):
                    break
        except Exception as exc:
            self.fail(exc)
        finally:
            self.handoff.close()

    def _composite(self) -> None:
        try:
            while (item := self.handoff.get()) is not None:
                frames = self.compositing.run(item)
                if frames is None:
                    continue
                self.planner.record_production((self._clock() - item.batch.planned_at) * 1000)
                if not self.output.put(frames):
                    break
        except Exception as exc:
            self.fail(exc)
        finally:
            self.output.finish()

    # -- output (the RPC's response generator) -------------------------------------------
    def frames(self) -> Iterator[cpb.StreamFrame]:
        self._threads = [
            in_context_thread(self._produce, name="stream-produce"),
            in_context_thread(self._composite, name="stream-composite"),
        ]
        for t in self._threads:
            t.start()
        try:
            yield from self.output.frames()
        finally:
            self.cancel()
            if self.encoder is not None:  # nothing encodes after the output's loop
                self.encoder.close()


def in_context_thread(target: Callable[..., object], *args: object, name: str) -> threading.Thread:
    """A daemon thread (not started) running `target(*args)` in a copy of the caller's
    context: the call's log ids and trace span go with it (one copy per thread: a context
    runs in one thread at a time)."""
    return threading.Thread(
        target=contextvars.copy_context().run, args=(target, *args), name=name, daemon=True
    )
