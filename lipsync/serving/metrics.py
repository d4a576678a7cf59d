"""Prometheus metrics both services share (docs/OPERATIONS.md lists every series).

Each running service owns its metrics: a subclass of `ServiceMetrics` in the service
(`inference_service/service_metrics.py: InferenceMetrics`,
`compositing_service/service_metrics.py: CompositingMetrics`) with its own
`CollectorRegistry` (no process-wide state, so two services in one process, as in the
tests, never mix their counts, and a stopped service leaves nothing behind) served over
HTTP by `MetricsServer` on `inference.metrics_port` / `compositing.metrics_port` (0: off;
port 0 in tests picks a free one). The base class holds the series every service has
(requests, durations, stages, calls in progress, build info) and the library's process
and platform collectors (CPU, memory, file descriptors); `GpuCollector` adds GPU memory
and utilisation where `nvidia-ml-py` and a GPU are (nothing, and no error, elsewhere).

The shared server interceptor (lipsync.serving.observability) knows no service's
messages: it hands each call's first request and every response to the service's
metrics (`call_started`, `count_response`, `call_ended`), which say what the messages
carry (the model, a stream's mode, frames delivered).

Cardinality: no series has a label per request, stream or frame. A `model_id` label is
given only through `ModelLabels`: the first `limit` avatars served get their own value,
later ones count as `model_id="other"`, so thousands of avatars give a bounded number of
series.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
EVICTION_REASONS = ("capacity", "unload", "idle")
# A BoundedStore's events (lipsync.serving.store) that drop an entry -> the reason label.
EVICTION_EVENTS = dict(zip(("evict", "unload", "idle_unload"), EVICTION_REASONS, strict=True))


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


@dataclass
class CallView:
    """What a service's metrics read from one call's first request: the method, the model
    it is for, and for a stream its mode ("realtime", "offline"; None: not a stream)."""

    rpc: str
    model_id: str = ""
    stream_mode: str | None = None


class ServiceMetrics:
    """The metrics every service has; a service subclasses it with its own series and
    says, through the three hooks below, what its messages carry."""

    def __init__(self, service: str):
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

    # -- what the service's messages carry (called by the server interceptor) -----------
    def call_started(self, rpc: str, request: Any) -> CallView:
        """A call's first request: the model it is for (every request of this project
        that names a model has a `model_id` field). A service whose requests say more (a
        stream's start message) overrides this."""
        return CallView(rpc, getattr(request, "model_id", "") or "")

    def count_response(self, call: CallView, response: Any) -> int:
        """Count what one response carries; returns the frames it delivered to the
        client (the access line's count). Nothing here: the service knows its replies."""
        return 0

    def call_ended(self, call: CallView) -> None:
        """The call ended, whatever its status (after `call_started`, or without a
        request read)."""

    # -- observations ------------------------------------------------------------------
    def stages(self, stages_ms: Mapping[str, float]) -> None:
        """One call's stage times (ms); keys with a dot (another service's stages, as the
        compositing service reports the inference service's) are skipped."""
        for stage, ms in stages_ms.items():
            if "." not in stage:
                self.stage_seconds.labels(self.service, stage).observe(ms / 1000.0)


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
