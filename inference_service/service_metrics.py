"""The inference service's metrics, health and traces hooked to its engine: registry
events (loads, evictions, per-model health `model/<id>`), UNet runs (batch sizes, queue
waits, `unet batch` spans) and gauges read at scrape time."""

from __future__ import annotations

from grpc_health.v1 import health

from inference_service.engine import InferenceEngine
from lipsync.serving.observability import ModelHealth, Observability, fan_out


def observe_engine(
    obs: Observability, engine: InferenceEngine, health_servicer: health.HealthServicer
) -> None:
    m = obs.metrics
    reg = engine.registry
    reg.on_event = fan_out(m.store_listener("models"), ModelHealth(health_servicer).on_event)
    engine.batch_events.append(m.batch_listener)
    if obs.tracing is not None:
        engine.batch_events.append(obs.tracing.batch_listener)
    m.models_loaded.set_function(lambda: len(reg.loaded_ids()))
    m.models_max.set(reg.max_models)
    m.model_bytes.set_function(reg.loaded_bytes)


def unobserve_engine(obs: Observability, engine: InferenceEngine) -> None:
    """Detach (an engine passed to `start` may outlive the service)."""
    engine.registry.on_event = None
    engine.batch_events.clear()
