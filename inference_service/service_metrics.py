"""The inference service's metrics (`InferenceMetrics`: the shared series of
lipsync.serving.metrics, its own and the GPU's), what its replies carry (frames inferred
and stage times, counted by the shared interceptor through its hooks), and the hooks to
its engine: registry events (loads, evictions, per-model health `model/<id>`), UNet runs
(batch sizes, queue waits, `unet batch` spans) and gauges read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health
from prometheus_client import Counter, Gauge, Histogram

from inference_service.batching import BatchRun
from inference_service.engine import InferenceEngine
from lipsync.proto import inference_pb2 as ipb
from lipsync.rpc.infer_wire import InferReply
from lipsync.serving.metrics import (
    BATCH_BUCKETS,
    EVICTION_EVENTS,
    EVICTION_REASONS,
    LOAD_BUCKETS,
    CallView,
    GpuCollector,
    ServiceMetrics,
)
from lipsync.serving.observability import ModelHealth, fan_out

if TYPE_CHECKING:
    from lipsync.serving.tracing import Tracing


class InferenceMetrics(ServiceMetrics):
    """The metrics of one inference service."""

    def __init__(self) -> None:
        super().__init__("inference")
        r = self.registry
        self.batch_size = Histogram(
            "lipsync_batch_size",
            "Frames per UNet run (dynamic batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inferred_frames = Counter(
            "lipsync_inferred_frames", "Frames the UNet produced for Infer calls.", registry=r
        )
        self.models_loaded = Gauge(
            "lipsync_models_loaded", "Avatars whose networks are in memory.", registry=r
        )
        self.models_max = Gauge("lipsync_models_max", "inference.registry.max_models.", registry=r)
        self.model_bytes = Gauge(
            "lipsync_model_file_bytes",
            "ONNX file bytes of the loaded networks (the registry's max_bytes budget).",
            registry=r,
        )
        self.model_loads = Counter(
            "lipsync_model_loads", "Networks loaded into memory.", registry=r
        )
        self.model_evictions = Counter(
            "lipsync_model_evictions",
            "Networks dropped from memory, by reason (capacity, unload, idle).",
            ["reason"],
            registry=r,
        )
        for reason in EVICTION_REASONS:
            self.model_evictions.labels(reason)
        self.model_load_seconds = Histogram(
            "lipsync_model_load_seconds",
            "Time to load one avatar's networks.",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        r.register(GpuCollector())

    # -- what the inference service's replies carry -------------------------------------
    def count_response(self, call: CallView, response: Any) -> int:
        """Infer: its stage times and the frames the UNet produced (none of them are
        delivered to a client here: the access line counts no frames)."""
        fields = response.fields if isinstance(response, InferReply) else response
        if isinstance(fields, ipb.InferResponse):
            self.stages(fields.stage_times_ms)
            self.inferred_frames.inc(fields.batch_size)
        return 0

    # -- the engine ----------------------------------------------------------------------
    def on_registry_event(self, event: str, _key: str, seconds: float) -> None:
        """The model registry's `BoundedStore.on_event`."""
        if event == "load":
            self.model_loads.inc()
            self.model_load_seconds.observe(seconds)
        elif event in EVICTION_EVENTS:
            self.model_evictions.labels(EVICTION_EVENTS[event]).inc()

    def on_batch(self, run: BatchRun) -> None:
        """`DynamicBatcher.events` of a UNet: the run's size and each request's wait."""
        self.batch_size.observe(run.rows)
        for wait in run.waits_s:
            self.stage_seconds.labels(self.service, "queue_wait").observe(wait)


def observe_engine(
    metrics: InferenceMetrics,
    engine: InferenceEngine,
    health_servicer: health.HealthServicer,
    tracing: Tracing | None = None,
) -> None:
    reg = engine.registry
    reg.on_event = fan_out(metrics.on_registry_event, ModelHealth(health_servicer).on_event)
    engine.batch_events.append(metrics.on_batch)
    if tracing is not None:
        engine.batch_events.append(tracing.batch_listener)
    metrics.models_loaded.set_function(lambda: len(reg.loaded_ids()))
    metrics.models_max.set(reg.max_models)
    metrics.model_bytes.set_function(reg.loaded_bytes)


def unobserve_engine(engine: InferenceEngine) -> None:
    """Detach (an engine passed to `start` may outlive the service)."""
    engine.registry.on_event = None
    engine.batch_events.clear()
