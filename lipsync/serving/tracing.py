"""OpenTelemetry traces, off by default (`tracing.enabled`; the `tracing` extra installs
opentelemetry-api/-sdk and the OTLP exporter, imported only here and only when on).

A trace of an InferBatchComposite call: the compositing service's server span, a client
hop per inference call carrying `traceparent` in the gRPC metadata (lipsync.serving.observability.
ClientObserver), the inference service's server span as its child, and a `unet batch`
span per UNet run, the child of the first request that joined the run and linked to
the others. Each service has its own TracerProvider (nothing process-wide is set), which
exports to `tracing.otlp_endpoint` over OTLP/gRPC; tests pass an in-memory exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lipsync.config import TracingConfig

log = logging.getLogger(__name__)


class Tracing:
    def __init__(self, cfg: TracingConfig, service_name: str, exporter: Any = None):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        if cfg.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint))
            )
        self.tracer = self.provider.get_tracer("lipsync")
        self.propagator = TraceContextTextMapPropagator()

    @contextmanager
    def server_span(self, rpc: str, metadata: dict[str, str]) -> Iterator[Any]:
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(metadata)
        with self.tracer.start_as_current_span(
            rpc, context=parent, kind=SpanKind.SERVER, attributes={"rpc.method": rpc}
        ) as span:
            yield span

    def annotate(self, **attributes: Any) -> None:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(attributes)

    def end_status(self, code: str, exc: BaseException | None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))

    def inject(self, metadata: list[tuple[str, str]]) -> None:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        metadata.extend(carrier.items())

    def batch_listener(self, run: Any) -> None:
        """`DynamicBatcher.events`: a span for the run, child of the first joined request
        (the contexts the batcher captured) and linked to every joined request."""
        from opentelemetry import trace
        from opentelemetry.trace import Link

        spans = [ctx.run(trace.get_current_span).get_span_context() for ctx in run.contexts]
        spans = [s for s in spans if s.is_valid]
        if not spans:
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(spans[0]))
        span = self.tracer.start_span(
            "unet batch",
            context=parent,
            links=[Link(s) for s in spans],
            start_time=int(run.started_ns),
            attributes={"batch.rows": run.rows, "batch.requests": len(run.waits_s)},
        )
        if run.error is not None:
            span.record_exception(run.error)
        span.end(end_time=int(run.started_ns + run.run_s * 1e9))

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception as exc:  # an unreachable collector must not stop a shutdown
            log.warning("tracing shutdown: %s", exc)
