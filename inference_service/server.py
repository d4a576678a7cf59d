"""The inference service's server (as KServe's model_server.py, apart from the servicer it
serves): `start` builds the engine (unless given one), the servicer, the gRPC server with
its observability interceptor, TLS, the health and metrics ports, preloads the models and
starts the idle reaper, and returns a `RunningService` (lipsync.serving.grpc_server: `stop` drains,
then releases). The scaffold of `python -m inference_service` is
`lipsync.serving.grpc_server.run_service`."""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2

from inference_service.engine import InferenceEngine
from inference_service.service_metrics import InferenceMetrics, observe_engine, unobserve_engine
from inference_service.servicer import InferenceServicer
from lipsync import __version__
from lipsync.config import Config
from lipsync.rpc.infer_wire import add_inference_servicer
from lipsync.rpc.tls import serve_health_port, server_credentials_of
from lipsync.serving.grpc_server import RunningService, add_health, bind, create_server
from lipsync.serving.observability import Observability

log = logging.getLogger(__name__)

SERVICE_NAME = "lipsync.inference.InferenceService"


def start(
    cfg: Config,
    port: int | None = None,
    engine: InferenceEngine | None = None,
    preload: bool = True,
) -> RunningService:
    """Start the inference service. `port=0` binds a free port. With `preload`, the
    models of `inference.registry.preload` are loaded before the health service says
    SERVING (calls that come earlier are served, loading what they need)."""
    engine = engine or InferenceEngine(cfg)
    metrics = InferenceMetrics()
    obs = Observability(cfg, metrics, cfg.inference.host, cfg.inference.metrics_port)
    server = create_server(
        cfg.inference.max_workers, cfg.limits.max_message_bytes, interceptors=obs.interceptors
    )
    servicer = InferenceServicer(engine, cfg)
    add_inference_servicer(servicer, server)
    health_servicer = add_health(server, [SERVICE_NAME])
    obs.attach(server, [SERVICE_NAME])
    observe_engine(metrics, engine, health_servicer, obs.tracing)
    tls = cfg.inference.tls  # with client_ca_file: only callers with a certificate it signed
    bound = bind(
        server,
        cfg.inference.host,
        cfg.inference.port if port is None else port,
        server_credentials_of(tls),
    )
    if preload:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    obs.serve()
    health_port = serve_health_port(health_servicer, cfg.inference.host, tls.health_port)
    log.info("inference service %s listening on %s:%d", __version__, cfg.inference.host, bound)
    if preload:
        engine.preload()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("preload done: %d model(s) loaded", len(engine.registry.loaded_ids()))
    engine.registry.start_idle_reaper()

    def close() -> None:  # after the server stopped
        if health_port is not None:
            health_port.stop(0)
        obs.close()
        unobserve_engine(engine)
        engine.close()

    return RunningService(server, bound, health_servicer, servicer, close, obs)
