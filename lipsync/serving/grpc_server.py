"""Serving plumbing both services share: servers with the project's options, the
standard health service, logging, and `run_service`, the scaffold of both `__main__`s
(config, logging, start, wait for SIGINT/SIGTERM, drain, stop)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lipsync.config import Config, load_config
from lipsync.rpc.channel import message_options
from lipsync.serving.logs import EarlyLogs

log = logging.getLogger(__name__)


def create_server(
    max_workers: int,
    max_message_bytes: int,
    interceptors: list[grpc.ServerInterceptor] | None = None,
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.Server:
    """A server with the project's options; `interceptors` run in list order (e.g. the
    API-key check of lipsync/serving/auth_interceptor.py). With `maximum_concurrent_rpcs`,
    calls past it are refused at once with RESOURCE_EXHAUSTED instead of queueing without
    bound."""
    from lipsync.serving.admission import quiet_undecodable_messages

    quiet_undecodable_messages()  # one line per undecodable message, no traceback
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors or []),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        options=[
            *message_options(max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ],
    )


def bind(
    server: grpc.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind a port, with TLS when `credentials` are given (lipsync/rpc/tls.py), else
    plaintext; port 0 picks a free one. Returns the bound port."""
    address = f"{host}:{port}"
    if credentials is not None:
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
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


def setup_logging(level: str, fmt: str = "text", service: str = "lipsync") -> None:
    """Logging of a service: lipsync.serving.logs (text or JSON lines, call ids)."""
    from lipsync.serving.logs import setup_logging as setup

    setup(level, fmt, service)


@dataclass
class RunningService:
    """What a service's `start` returns: its server and port, its health service, its
    servicer, and how to release what it holds once the server has stopped."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: Any
    on_close: Callable[[], None]
    # lipsync.serving.observability.Observability: metrics registry and port, tracing
    observability: Any = None

    @property
    def metrics_port(self) -> int:
        """The bound /metrics port (0: off)."""
        return self.observability.port if self.observability is not None else 0

    def stop(self, grace_s: float = 2.0) -> None:
        """NOT_SERVING at once, refuse new work, let in-flight calls finish for up to
        `grace_s`, then cancel what is left and release.

        A servicer with `drain()` and `idle()` refuses new work itself (and, e.g., ends
        realtime streams cleanly); the server then stays up, answering health checks with
        NOT_SERVING, until the servicer is idle or the grace ends. Otherwise the server
        stops taking calls at once and drains for `grace_s`."""
        end = time.monotonic() + grace_s
        self.health.enter_graceful_shutdown()
        drain = getattr(self.servicer, "drain", None)
        idle = getattr(self.servicer, "idle", None)
        if drain is not None and idle is not None:
            try:
                drain()
                while not idle() and time.monotonic() < end:
                    time.sleep(0.05)
            except Exception:
                log.exception("drain failed")
        left = max(0.0, end - time.monotonic())
        self.server.stop(left).wait(left + 1.0)
        self.close()

    def close(self) -> None:
        self.on_close()


def wait_for_termination(running: RunningService, grace_s: float = 5.0) -> None:
    """Block until SIGINT/SIGTERM; then report NOT_SERVING at once (load balancers and
    probes stop sending new work), drain in-flight calls for up to `grace_s`, close.
    The process then exits even if a handler thread is still blocked (a misbehaving
    client): after a few seconds more, `os._exit`."""
    done = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    done.wait()
    watchdog = threading.Timer(grace_s + 10.0, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    running.stop(grace_s)
    # Threads still blocked now would hold up the interpreter's exit (ThreadPoolExecutor
    # joins its workers): give them a moment, then leave.
    exit_timer = threading.Timer(2.0, _exit_now)
    exit_timer.daemon = True
    exit_timer.start()


def _exit_now() -> None:
    log.warning("threads still running after shutdown: exiting now")
    logging.shutdown()
    os._exit(0)


def run_service(
    prog: str,
    description: str | None,
    port_of: Callable[[Config], Any],
    start: Callable[[Config], RunningService],
    argv: list[str] | None = None,
) -> int:
    """`python -m <service> [--config FILE] [--port N]`: load the config (YAML and
    environment), set up logging, start the service and serve until a signal."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    ap.add_argument("--port", type=int, help="override the service's port")
    args = ap.parse_args(argv)
    with EarlyLogs() as early:  # the config's own warnings, replayed in the log format
        cfg = load_config(args.config)
    if args.port is not None:
        port_of(cfg).port = args.port
    setup_logging(cfg.log_level, cfg.log_format, prog)
    early.replay()
    wait_for_termination(start(cfg), cfg.shutdown_grace_s)
    return 0
