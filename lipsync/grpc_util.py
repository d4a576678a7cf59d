"""gRPC plumbing shared by both services and the client: channel/server options,
the standard health service, and graceful shutdown on signals."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def create_server(max_workers: int, max_message_bytes: int) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            *message_options(max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ],
    )


def create_channel(address: str, max_message_bytes: int) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            *message_options(max_message_bytes),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.enable_retries", 1),
        ],
    )


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Bind an insecure port; port 0 picks a free one. Returns the bound port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return bound


def add_health(server: grpc.Server, service_names: list[str]) -> health.HealthServicer:
    """Serve grpc.health.v1 with '' and each service name SERVING."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def set_not_serving(servicer: health.HealthServicer) -> None:
    servicer.enter_graceful_shutdown()


def wait_for_termination(server: grpc.Server, grace_s: float = 5.0, on_stop: Any = None) -> None:
    """Block until SIGINT/SIGTERM, then stop the server gracefully."""
    done = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    done.wait()
    server.stop(grace_s).wait()  # drain in-flight requests first
    if on_stop is not None:
        on_stop()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
