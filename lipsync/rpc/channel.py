"""Client channels with the project's options, and waiting for a service's health check."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import grpc


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def create_channel(
    address: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """A channel with the project's options; TLS with `credentials` (lipsync/rpc/tls.py)."""
    options = [
        *message_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.enable_retries", 1),
        # reconnect soon after a restarted server is back (default backoff: 1 s growing
        # to 120 s; docs/RELIABILITY.md)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def wait_healthy(
    address: str,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gRPC health service at `address` says SERVING (over TLS with
    `credentials`)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # the services' extra

    deadline = time.monotonic() + timeout_s
    with create_channel(address, 4 << 20, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service for {address} exited with code {proc.returncode}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)
