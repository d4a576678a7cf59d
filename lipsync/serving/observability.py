"""What an operator sees of a service: metrics, access log lines, request ids, traces,
server reflection and per-model health (docs/OPERATIONS.md).

`Observability` is built by a service's `start` and gives `create_server` its interceptor
(`ServerObserver`); the service then calls `attach(server)` (reflection), `serve()` (the
/metrics port) and, once stopped, `close()`.

Every RPC passes `ServerObserver`: it takes the caller's `x-request-id` (or makes one),
tags the call's log lines with it (lipsync.serving.logs), opens a server span whose parent
comes from the caller's `traceparent` (with tracing on), counts `lipsync_requests_total`
and the call's duration, keeps `lipsync_queue_depth` (calls in progress) and writes one
access line. It knows no service's messages: the service's metrics (a
`lipsync.serving.metrics.ServiceMetrics`) read the call's first request (`call_started`:
its model, a stream's mode), count each response (`count_response`: stage times, frames
delivered) and close what the call opened (`call_ended`).
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from lipsync.config import Config
from lipsync.serving.logs import add_ids, call_ids, current_ids
from lipsync.serving.metrics import CallView, MetricsServer, ServiceMetrics

log = logging.getLogger(__name__)
access = logging.getLogger("lipsync.access")

REQUEST_ID_KEY = "x-request-id"
# RPCs whose access lines are DEBUG whatever access_log says (probes, tooling).
_QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

# The status an RPC answered inside its message (InferBatchComposite's success=false),
# noted by the servicer for the interceptor's count.
_NOTED: contextvars.ContextVar[list[grpc.StatusCode] | None] = contextvars.ContextVar(
    "lipsync_noted_status", default=None
)


def note_status(code: grpc.StatusCode) -> None:
    """Count this call under `code` though it answers OK at the gRPC level."""
    slot = _NOTED.get()
    if slot is not None:
        slot.append(code)


class _Call:
    """One RPC being served: its ids, span, timing and what its messages said."""

    def __init__(self, obs: ServerObserver, method: str, metadata: dict[str, str]):
        self.obs = obs
        self.service_name, _, self.rpc = method.lstrip("/").rpartition("/")
        self.request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16]
        self.metadata = metadata
        self.t0 = time.perf_counter()
        self.view = CallView(self.rpc)  # until its first request is read
        self.frames = 0
        self.noted: list[grpc.StatusCode] = []
        self._stack = ExitStack()
        self._done = False

    def begin(self) -> None:
        self._stack.enter_context(call_ids(request_id=self.request_id, rpc=self.rpc))
        self._noted_token = _NOTED.set(self.noted)
        if self.obs.tracing is not None:
            self.span = self._stack.enter_context(
                self.obs.tracing.server_span(self.rpc, self.metadata)
            )
        m = self.obs.metrics
        m.queue_depth.labels(m.service).inc()

    def request(self, req: Any) -> None:
        """The call's first request, read by the service's metrics."""
        self.view = view = self.obs.metrics.call_started(self.rpc, req)
        if view.stream_mode is not None:
            add_ids(stream_id=self.request_id)
        if view.model_id:
            add_ids(model_id=view.model_id)
            if self.obs.tracing is not None:
                self.obs.tracing.annotate(model_id=view.model_id)

    def response(self, resp: Any) -> None:
        self.frames += self.obs.metrics.count_response(self.view, resp)

    def finish(self, code: grpc.StatusCode | None, exc: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        if code is None:
            code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
        if code == grpc.StatusCode.OK and self.noted:
            code = self.noted[-1]
        seconds = time.perf_counter() - self.t0
        m = self.obs.metrics
        m.requests.labels(m.service, self.rpc, code.name).inc()
        m.request_seconds.labels(m.service, self.rpc).observe(seconds)
        m.queue_depth.labels(m.service).dec()
        m.call_ended(self.view)
        if self.obs.tracing is not None:
            self.obs.tracing.end_status(code.name, exc)
        level = self.obs.access_level
        if self.service_name.startswith(_QUIET_SERVICES):
            level = logging.DEBUG
        if level is not None and access.isEnabledFor(level):
            extra: dict[str, Any] = {
                "code": code.name,
                "duration_ms": round(seconds * 1000.0, 3),
            }
            if self.frames:
                extra["frames"] = self.frames
            access.log(
                level,
                "%s %s %.1f ms%s",
                self.rpc,
                code.name,
                seconds * 1000.0,
                f" {self.frames} frames" if self.frames else "",
                extra=extra,
            )
        with suppress(ValueError):  # finished in another context (a stream closed elsewhere)
            _NOTED.reset(self._noted_token)
        with suppress(ValueError):
            self._stack.close()


class ServerObserver(grpc.ServerInterceptor):
    def __init__(
        self,
        metrics: ServiceMetrics,
        access_log: str = "info",
        tracing: Any = None,
    ):
        self.metrics = metrics
        self.tracing = tracing
        self.access_level = {"info": logging.INFO, "debug": logging.DEBUG}.get(access_log)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = {
            k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)
        }
        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=self._single_response(handler.unary_unary, method, metadata, False)
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            return handler._replace(
                unary_stream=self._streaming(lambda r, c: behavior(r, c), method, metadata, False)
            )
        if handler.stream_unary is not None:
            return handler._replace(
                stream_unary=self._single_response(handler.stream_unary, method, metadata, True)
            )
        return handler._replace(
            stream_stream=self._streaming(handler.stream_stream, method, metadata, True)
        )

    def _single_response(self, behavior, method: str, metadata: dict[str, str], stream_in: bool):  # type: ignore[no-untyped-def]
        """A call with one response: its request is seen whole (unary) or as it streams."""

        def wrapped(request, context):  # type: ignore[no-untyped-def]
            call = _Call(self, method, metadata)
            call.begin()
            try:
                if stream_in:
                    request = _requests(request, call)
                else:
                    call.request(request)
                response = behavior(request, context)
                call.response(response)
            except BaseException as exc:
                call.finish(_context_code(context), exc)
                raise
            call.finish(_context_code(context))
            return response

        return wrapped

    def _streaming(self, behavior, method, metadata, stream_in: bool):  # type: ignore[no-untyped-def]
        def wrapped(request, context) -> Iterator[Any]:  # type: ignore[no-untyped-def]
            call = _Call(self, method, metadata)
            call.begin()
            try:
                if stream_in:
                    request = _requests(request, call)
                else:
                    call.request(request)
                for response in behavior(request, context):
                    call.response(response)
                    yield response
            except GeneratorExit:  # the client went away
                call.finish(grpc.StatusCode.CANCELLED)
                raise
            except BaseException as exc:
                call.finish(_context_code(context), exc)
                raise
            call.finish(_context_code(context))

        return wrapped


def _requests(iterator: Iterator[Any], call: _Call) -> Iterator[Any]:
    first = True
    for req in iterator:
        if first:
            call.request(req)
            first = False
        yield req


def _context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:
        return None
    return code if isinstance(code, grpc.StatusCode) else None


class ClientObserver(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Carries the call's request id (`x-request-id`) and trace context (`traceparent`)
    to the services this one calls."""

    def __init__(self, tracing: Any = None):
        self.tracing = tracing

    def _details(self, details):  # type: ignore[no-untyped-def]
        metadata = list(details.metadata or ())
        rid = current_ids().get("request_id")
        if rid:
            metadata.append((REQUEST_ID_KEY, rid))
        if self.tracing is not None:
            self.tracing.inject(metadata)
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # type: ignore[no-untyped-def]
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class Observability:
    """A service's metrics (the service's own `ServiceMetrics`) and their port,
    interceptors, tracing and reflection."""

    def __init__(self, cfg: Config, metrics: ServiceMetrics, host: str, metrics_port: int):
        self.service = metrics.service
        self.host = host
        self.metrics_port = metrics_port
        self.metrics = metrics
        self.tracing = None
        if cfg.tracing.enabled:
            from lipsync.serving.tracing import Tracing

            self.tracing = Tracing(cfg.tracing, f"lipsync-{self.service}")
        self.server_interceptor = ServerObserver(self.metrics, cfg.access_log, self.tracing)
        self.client_interceptor = ClientObserver(self.tracing)
        self.http: MetricsServer | None = None

    @property
    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [self.server_interceptor]

    def attach(self, server: grpc.Server, service_names: list[str]) -> None:
        """Server reflection for `service_names` (and itself)."""
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME), server
        )

    def serve(self) -> int:
        """Start the /metrics port (unless it is 0); returns the bound port or 0."""
        if self.metrics_port and self.http is None:
            try:
                self.http = MetricsServer(self.metrics.registry, self.host, self.metrics_port)
            except OSError as exc:  # the service itself still runs
                log.error("metrics port %s:%d: %s; no /metrics", self.host, self.metrics_port, exc)
                return 0
            log.info("metrics on http://%s:%d/metrics", self.host, self.http.port)
        return self.http.port if self.http else 0

    @property
    def port(self) -> int:
        return self.http.port if self.http else 0

    def close(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.tracing is not None:
            self.tracing.shutdown()


class ModelHealth:
    """grpc.health.v1 per model: `model/<id>` is SERVING while the model is loaded,
    NOT_SERVING once it is unloaded or evicted (a name never loaded is NOT_FOUND, as the
    standard health service answers unknown names). Fed by a store's events."""

    PREFIX = "model/"

    def __init__(self, servicer: health.HealthServicer):
        self.servicer = servicer

    def on_event(self, event: str, key: str, _seconds: float) -> None:
        if event == "load":
            self.servicer.set(self.PREFIX + key, health_pb2.HealthCheckResponse.SERVING)
        elif event in ("evict", "unload", "idle_unload"):
            self.servicer.set(self.PREFIX + key, health_pb2.HealthCheckResponse.NOT_SERVING)


def fan_out(*listeners: Callable[[str, str, float], None]) -> Callable[[str, str, float], None]:
    """One `BoundedStore.on_event` calling each of `listeners`."""

    def on_event(event: str, key: str, seconds: float) -> None:
        for listener in listeners:
            listener(event, key, seconds)

    return on_event
