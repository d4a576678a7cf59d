"""The compositing service's metrics and health hooked to its parts: to its frames store
(cache hits, misses, loads and evictions, bytes held (read at scrape time), and per-avatar
health `model/<id>`, SERVING while its frames are decoded in memory) and to its realtime
streams' pacers (slots skipped, frames sent late)."""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health

from compositing_service.frames import FrameStore
from compositing_service.streaming import LATE, SKIPPED
from lipsync.serving.metrics import ServiceMetrics
from lipsync.serving.observability import ModelHealth, Observability, fan_out


def observe_frames(
    obs: Observability, frames: FrameStore, health_servicer: health.HealthServicer
) -> None:
    m = obs.metrics
    frames.on_event = fan_out(m.store_listener("frames"), ModelHealth(health_servicer).on_event)
    m.cache_bytes.set_function(frames.loaded_bytes)
    m.cache_avatars.set_function(lambda: len(frames.loaded_ids()))


def pace_events(metrics: ServiceMetrics) -> Callable[[str], None]:
    """A realtime stream's `on_pace` (RealtimePacer.on_event): each skipped slot counts in
    `lipsync_realtime_frames_skipped_total`, each late frame in
    `lipsync_realtime_frames_late_total`."""
    counters = {SKIPPED: metrics.realtime_skipped, LATE: metrics.realtime_late}

    def on_event(event: str) -> None:
        counter = counters.get(event)
        if counter is not None:
            counter.inc()

    return on_event
