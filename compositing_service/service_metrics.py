"""The compositing service's metrics (`CompositingMetrics`: the shared series of
lipsync.serving.metrics and its own), what its messages carry (frames delivered, a
stream's mode and latency, counted by the shared interceptor through its hooks), and the
hooks to its parts: its frames store (cache hits, misses, loads and evictions, bytes
held (read at scrape time), and per-avatar health `model/<id>`, SERVING while its frames
are decoded in memory) and its realtime streams' pacers (slots skipped, frames sent
late)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health
from prometheus_client import Counter, Gauge, Histogram

from compositing_service.frames import FrameStore
from compositing_service.streaming import LATE, SKIPPED
from lipsync.proto import compositing_pb2 as cpb
from lipsync.serving.metrics import (
    EVICTION_EVENTS,
    EVICTION_REASONS,
    LATENCY_BUCKETS,
    LOAD_BUCKETS,
    CallView,
    ModelLabels,
    ServiceMetrics,
)
from lipsync.serving.observability import ModelHealth, fan_out

STREAM_MODES = ("realtime", "offline")


class CompositingMetrics(ServiceMetrics):
    """The metrics of one compositing service. `model_labels`: how many avatars get their
    own `model_id` value on `lipsync_frames_total` (`compositing.metrics_model_labels`;
    the rest count as "other")."""

    def __init__(self, model_labels: int = 50):
        super().__init__("compositing")
        r = self.registry
        self.model_label = ModelLabels(model_labels)
        self.frames = Counter(
            "lipsync_frames",
            "Frames delivered to clients (model_id: the first metrics_model_labels "
            "avatars, then 'other').",
            ["model_id", "rpc"],
            registry=r,
        )
        self.active_streams = Gauge(
            "lipsync_active_streams", "Open StreamComposite streams.", ["mode"], registry=r
        )
        for mode in STREAM_MODES:
            self.active_streams.labels(mode)
        self.realtime_late = Counter(
            "lipsync_realtime_frames_late",
            "Realtime stream frames sent more than one frame interval after their slot was "
            "due on the stream's clock (counted by the stream's pacer).",
            registry=r,
        )
        self.realtime_skipped = Counter(
            "lipsync_realtime_frames_skipped",
            "Realtime stream slots skipped to catch up with the clock (counted by the "
            "stream's pacer: idle frames dropped for a slow client).",
            registry=r,
        )
        self.stream_latency = Histogram(
            "lipsync_stream_frame_latency_seconds",
            "StreamComposite: from the arrival of the last audio a speech frame needed to "
            "its sending (StreamFrame.latency_ms).",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for mode in STREAM_MODES:
            self.stream_latency.labels(mode)
        self.cache_hits = Counter(
            "lipsync_background_cache_hits",
            "Lookups of an avatar's frames already decoded in memory.",
            registry=r,
        )
        self.cache_misses = Counter(
            "lipsync_background_cache_misses",
            "Lookups that had to load (decode) an avatar's frames.",
            registry=r,
        )
        self.cache_evictions = Counter(
            "lipsync_background_cache_evictions",
            "Avatars' frames dropped from memory (capacity, unload, idle).",
            ["reason"],
            registry=r,
        )
        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason)
        self.cache_load_seconds = Histogram(
            "lipsync_background_cache_load_seconds",
            "Time to load one avatar's frames (its files read, headers checked).",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.cache_bytes = Gauge(
            "lipsync_background_cache_bytes",
            "Bytes the frames store holds: frame files and their cached JPEGs.",
            registry=r,
        )
        self.cache_avatars = Gauge(
            "lipsync_background_cache_avatars", "Avatars whose frames are held.", registry=r
        )

    # -- what the compositing service's messages carry ----------------------------------
    def call_started(self, rpc: str, request: Any) -> CallView:
        """A stream is for the model of its start message and opens in its mode."""
        if not isinstance(request, cpb.StreamRequest):
            return super().call_started(rpc, request)
        if not request.HasField("start"):  # refused by the servicer: not counted open
            return CallView(rpc)
        start = request.start
        mode = "realtime" if start.realtime else "offline"
        self.active_streams.labels(mode).inc()
        return CallView(rpc, start.model_id, mode)

    def count_response(self, call: CallView, response: Any) -> int:
        """InferBatchComposite: its stages and (answered with success) its frames; a
        stream: each StreamFrame sent (idle frames too), and a speech frame's latency."""
        if isinstance(response, cpb.CompositeBatchResponse):
            self.stages(response.stage_times_ms)
            if not response.success:
                return 0
            n = len(response.composited_frames)
            self.frames.labels(self.model_label(call.model_id), call.rpc).inc(n)
            return n
        if isinstance(response, cpb.StreamFrame):
            self.frames.labels(self.model_label(call.model_id), call.rpc).inc()
            if response.generated and call.stream_mode is not None:
                self.stream_latency.labels(call.stream_mode).observe(response.latency_ms / 1e3)
            return 1
        return 0

    def call_ended(self, call: CallView) -> None:
        if call.stream_mode is not None:
            self.active_streams.labels(call.stream_mode).dec()

    # -- the frames store ----------------------------------------------------------------
    def on_frames_event(self, event: str, _key: str, seconds: float) -> None:
        """The frames store's `BoundedStore.on_event`."""
        if event == "hit":
            self.cache_hits.inc()
        elif event == "miss":
            self.cache_misses.inc()
        elif event == "load":
            self.cache_load_seconds.observe(seconds)
        elif event in EVICTION_EVENTS:
            self.cache_evictions.labels(EVICTION_EVENTS[event]).inc()


def observe_frames(
    metrics: CompositingMetrics, frames: FrameStore, health_servicer: health.HealthServicer
) -> None:
    frames.on_event = fan_out(metrics.on_frames_event, ModelHealth(health_servicer).on_event)
    metrics.cache_bytes.set_function(frames.loaded_bytes)
    metrics.cache_avatars.set_function(lambda: len(frames.loaded_ids()))


def pace_events(metrics: CompositingMetrics) -> Callable[[str], None]:
    """A realtime stream's `on_pace` (RealtimePacer.on_event): each skipped slot counts in
    `lipsync_realtime_frames_skipped_total`, each late frame in
    `lipsync_realtime_frames_late_total`."""
    counters = {SKIPPED: metrics.realtime_skipped, LATE: metrics.realtime_late}

    def on_event(event: str) -> None:
        counter = counters.get(event)
        if counter is not None:
            counter.inc()

    return on_event
