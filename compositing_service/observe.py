"""The compositing service's metrics and health hooked to its frames store: cache hits,
misses, loads and evictions, bytes held (read at scrape time), and per-avatar health
`model/<id>` (SERVING while its frames are decoded in memory)."""

from __future__ import annotations

from grpc_health.v1 import health

from compositing_service.frames import FrameStore
from lipsync.rpc.observe import ModelHealth, Observability, fan_out


def observe_frames(
    obs: Observability, frames: FrameStore, health_servicer: health.HealthServicer
) -> None:
    m = obs.metrics
    frames.on_event = fan_out(m.store_listener("frames"), ModelHealth(health_servicer).on_event)
    m.cache_bytes.set_function(frames.loaded_bytes)
    m.cache_avatars.set_function(lambda: len(frames.loaded_ids()))
