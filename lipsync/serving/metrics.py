"""Prometheus metrics of the services (docs/OPERATIONS.md lists every series).

Each running service owns a `ServiceMetrics`: its own `CollectorRegistry` (no process-wide
state, so two services in one process, as in the tests, never mix their counts, and a
stopped service leaves nothing behind) served over HTTP by `MetricsServer` on
`inference.metrics_port` / `compositing.metrics_port` (0: off; port 0 in tests picks a
free one). The library's process and platform collectors add CPU, memory and file
descriptors; `GpuCollector` adds GPU memory and utilisation where `nvidia-ml-py` and a GPU
are (nothing, and no error, elsewhere).

Cardinality: no series has a label per request, stream or frame. `model_id` appears only
on `lipsync_frames_total`, and only for the first `compositing.metrics_model_labels`
avatars served; later ones count as `model_id="other"` (`ModelLabels`), so thousands of
avatars give a bounded number of series. Stage and batch histograms have no model label.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from lipsync import __version__

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 3, 5)
EVICTION_REASONS = ("capacity", "unload", "idle")
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ModelLabels:
    """The `model_id` label value of a model: its id for the first `limit` ids seen,
    "other" for the rest (a bounded number of series whatever the number of avatars)."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, model_id: str) -> str:
        if not model_id:
            return "none"
        with self._lock:
            if model_id in self._ids:
                return model_id
            if len(self._ids) < self.limit:
                self._ids.add(model_id)
                return model_id
        return "other"


class ServiceMetrics:
    """The metrics of one service ("inference" or "compositing")."""

    def __init__(self, service: str, model_labels: int = 50):
        self.service = service
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge(
            "lipsync_build_info", "Version of the service.", ["service", "version"], registry=r
        ).labels(service, __version__).set(1)
        self.requests = Counter(
            "lipsync_requests",
            "RPCs answered, by method and gRPC status code.",
            ["service", "rpc", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "lipsync_request_seconds",
            "RPC duration (streams: their whole length).",
            ["service", "rpc"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "lipsync_stage_seconds",
            "Time of one stage of one call (the stage's total over the call's frames).",
            ["service", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lipsync_queue_depth",
            "RPCs accepted and not yet answered (streams included).",
            ["service"],
            registry=r,
        )
        self.queue_depth.labels(service)
        self.model_label = ModelLabels(model_labels)
        if service == "compositing":
            self._compositing(r)
        else:
            self._inference(r)

    # -- per service -------------------------------------------------------------------
    def _compositing(self, r: CollectorRegistry) -> None:
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
        for mode in ("realtime", "offline"):
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
        for mode in ("realtime", "offline"):
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

    def _inference(self, r: CollectorRegistry) -> None:
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

    # -- observations ------------------------------------------------------------------
    def stages(self, stages_ms: Mapping[str, float]) -> None:
        """One call's stage times (ms); keys with a dot (another service's stages, as the
        compositing service reports the inference service's) are skipped."""
        for stage, ms in stages_ms.items():
            if "." not in stage:
                self.stage_seconds.labels(self.service, stage).observe(ms / 1000.0)

    def store_listener(self, kind: str) -> Callable[[str, str, float], None]:
        """A `BoundedStore.on_event` for the model registry ("models") or the frames
        store ("frames")."""
        reasons = dict(zip(("evict", "unload", "idle_unload"), EVICTION_REASONS, strict=True))

        def on_event(event: str, key: str, seconds: float) -> None:
            if kind == "frames":
                if event == "hit":
                    self.cache_hits.inc()
                elif event == "miss":
                    self.cache_misses.inc()
                elif event == "load":
                    self.cache_load_seconds.observe(seconds)
                elif event in reasons:
                    self.cache_evictions.labels(reasons[event]).inc()
            else:
                if event == "load":
                    self.model_loads.inc()
                    self.model_load_seconds.observe(seconds)
                elif event in reasons:
                    self.model_evictions.labels(reasons[event]).inc()

        return on_event

    def batch_listener(self, run) -> None:  # type: ignore[no-untyped-def]
        """`DynamicBatcher.events` of a UNet: the run's size and each request's wait."""
        self.batch_size.observe(run.rows)
        for wait in run.waits_s:
            self.stage_seconds.labels(self.service, "queue_wait").observe(wait)


class GpuCollector:
    """GPU memory and utilisation through NVML (`nvidia-ml-py`, the inference-gpu extra).
    Without the package, a driver or a GPU it reports nothing."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
            self._nvml = pynvml
        except Exception as exc:  # no package, no driver, no GPU
            log.debug("no GPU metrics: %s", exc)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if self._nvml is None:
            return []
        nv = self._nvml
        used = GaugeMetricFamily(
            "lipsync_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        total = GaugeMetricFamily("lipsync_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        util = GaugeMetricFamily(
            "lipsync_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=["gpu"]
        )
        try:
            for i in range(self._count):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                used.add_metric([str(i)], float(mem.used))
                total.add_metric([str(i)], float(mem.total))
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
        except Exception as exc:
            log.debug("GPU metrics failed: %s", exc)
            return []
        return [used, total, util]


class MetricsServer:
    """/metrics of one registry over HTTP on (host, port); port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._httpd.server_port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
