"""The compositing service's server (as KServe's model_server.py, apart from the servicer
it serves): `start` builds the parts (frames store, inference client or router,
compositor, dataplane, model admin), the servicer, the gRPC server with its interceptors
(observability, API keys, TLS), the health and metrics ports and the readiness watcher,
and returns a `RunningService` (lipsync.serving.grpc_server: `stop` drains, then releases). The
scaffold of `python -m compositing_service` is `lipsync.serving.grpc_server.run_service`."""

from __future__ import annotations

import logging
import threading

from compositing_service import rpc_policies
from compositing_service.admin import ModelAdmin
from compositing_service.compositor import Compositor
from compositing_service.dataplane import BatchDataplane
from compositing_service.endpoints import is_multi_target
from compositing_service.frames import FrameStore
from compositing_service.inference_client import InferenceClient
from compositing_service.routing import connect_inference
from compositing_service.service_metrics import CompositingMetrics, observe_frames
from compositing_service.servicer import CompositingServicer
from compositing_service.video_encoder import choose_encoder
from lipsync import __version__
from lipsync.avatars.package import AvatarCatalog
from lipsync.config import Config
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.tls import serve_health_port
from lipsync.serving.admission import HealthWatcher, set_health
from lipsync.serving.grpc_server import RunningService, add_health, bind, create_server
from lipsync.serving.observability import Observability

log = logging.getLogger(__name__)

SERVICE_NAME = "compositing.CompositingService"
# Readiness: the standard health status of SERVICE_NAME turns NOT_SERVING while the
# inference service cannot be reached (and on shutdown); "" stays SERVING while the process
# can answer (liveness): docs/RELIABILITY.md.
READINESS_NAMES = (SERVICE_NAME,)


def start(cfg: Config, port: int | None = None, preload: bool = True) -> RunningService:
    """Start the compositing service (non-blocking). `port=0` binds a free port."""
    c = cfg.compositing
    # H.264 streams: the first configured encoder that works here; none is an error now,
    # not a failure of every H.264 stream later
    h264_encoder = choose_encoder(c.stream.h264)
    log.info("H.264 streams use the %s encoder", h264_encoder)
    metrics = CompositingMetrics(c.metrics_model_labels)
    obs = Observability(cfg, metrics, c.host, c.metrics_port)
    catalog = AvatarCatalog(cfg.avatars_path)
    fc = c.frame_cache
    frames = FrameStore(catalog, fc.max_avatars, fc.max_bytes, fc.decoded_max_bytes)
    # One address: its client retries a call through a restart (docs/RELIABILITY.md);
    # replicas: the router fails the call over to another replica instead.
    retry_s = 0.0 if is_multi_target(c.inference_address) else c.admission.inference_retry_s
    inference = connect_inference(  # one address, or replicas routed by avatar
        cfg,
        lambda address: InferenceClient(
            address,
            cfg.limits.max_message_bytes,
            c.inference_timeout_s,
            c.transfer_dtype,
            rpc_policies.inference_credentials(cfg),
            interceptors=[obs.client_interceptor],
            retry_s=retry_s,
        ),
    )
    compositor = Compositor(c.jpeg_quality, c.workers)
    dataplane = BatchDataplane(frames, inference, compositor, c.inference_chunk, 2 * c.max_workers)
    servicer = CompositingServicer(
        cfg,
        ModelAdmin(catalog, frames, inference),
        dataplane,
        frames,
        inference,
        compositor,
        metrics=metrics,
        h264_encoder=h264_encoder,
    )
    # Streams hold a handler thread for their life: they get max_sessions threads of their
    # own (admission counts them), so unary calls and health checks always find one of
    # max_workers; calls past all of them (and a queue as long) are refused at once.
    threads = c.max_workers + c.stream.max_sessions
    server = create_server(
        threads,
        cfg.limits.max_message_bytes,
        interceptors=[*obs.interceptors, *rpc_policies.interceptors(cfg)],
        maximum_concurrent_rpcs=threads + c.max_workers,
    )
    cpb_grpc.add_CompositingServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE_NAME])
    obs.attach(server, [SERVICE_NAME])
    observe_frames(metrics, frames, health_servicer)
    port = c.port if port is None else port
    bound = bind(server, c.host, port, rpc_policies.server_credentials(cfg))
    server.start()
    obs.serve()
    health_port = serve_health_port(health_servicer, c.host, c.tls.health_port)
    watcher = None
    if c.admission.health_watch_s > 0:  # readiness follows the inference service's health
        watcher = HealthWatcher(
            lambda: inference.healthy(min(1.0, c.admission.health_watch_s)),
            lambda ok: _readiness_changed(health_servicer, ok, c.inference_address),
            c.admission.health_watch_s,
            name="inference-health-watch",
        ).start()
    if preload:
        threading.Thread(
            target=frames.preload_ids,
            args=(c.frame_cache.preload,),
            name="frame-preload",
            daemon=True,
        ).start()
    log.info(
        "compositing service %s listening on %s:%d (inference at %s)",
        __version__,
        c.host,
        bound,
        c.inference_address,
    )

    def close() -> None:  # after the server stopped
        if watcher is not None:
            watcher.stop()
        servicer.streams.stop()
        if health_port is not None:
            health_port.stop(0)
        inference.close()
        compositor.close()
        dataplane.close()
        obs.close()

    return RunningService(server, bound, health_servicer, servicer, close, obs)


def _readiness_changed(health_servicer, ok: bool, address: str) -> None:  # type: ignore[no-untyped-def]
    if ok:
        log.info("inference service at %s is reachable: ready", address)
    else:
        log.warning("inference service at %s is not reachable: not ready", address)
    set_health(health_servicer, READINESS_NAMES, ok)
