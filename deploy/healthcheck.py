"""Container health check of the images (Docker HEALTHCHECK, compose healthcheck).

    python /opt/lipsync/healthcheck.py inference     # grpc.health.v1 Check on inference.port
    python /opt/lipsync/healthcheck.py compositing   # ... on compositing.port
    python /opt/lipsync/healthcheck.py web           # GET /healthz on web.port

The port comes from the service's own configuration (LIPSYNC_CONFIG, LIPSYNC_* variables),
so a port changed there is checked there; a gRPC service with TLS is checked on its
plaintext `tls.health_port` when that is set. Exit 0 when healthy, 1 otherwise (one line on
stderr says why). Each check gives up after --timeout seconds (default 4).
"""

from __future__ import annotations

import argparse
import sys
import urllib.request


def check_grpc(port: int, timeout_s: float) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"grpc health check on port {port} failed: {exc.code().name}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return f"port {port} answers {status}"
    return None


def check_http(port: int, timeout_s: float) -> str | None:
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                return f"{url} answered {resp.status}"
    except OSError as exc:
        return f"{url}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("service", choices=["inference", "compositing", "web"])
    ap.add_argument("--timeout", type=float, default=4.0)
    args = ap.parse_args(argv)
    from lipsync.config import load_config

    cfg = load_config()
    if args.service == "web":
        error = check_http(cfg.web.port, args.timeout)
    else:
        section = getattr(cfg, args.service)
        health_port = getattr(getattr(section, "tls", None), "health_port", 0)
        error = check_grpc(health_port or section.port, args.timeout)
    if error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
