"""The gateway's /metrics (Prometheus text, on the gateway's own port): open WebSocket
and WebRTC sessions, HTTP requests by route and status, and the process collectors. Each app has
its own registry (several apps in one process, as in tests, keep their own counts)."""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def add_metrics(
    app: web.Application, sockets: weakref.WeakSet, peers: Collection[object] = ()
) -> None:
    """Serve GET /metrics on `app` and count its requests; `sockets`: the open WebSocket
    sessions, `peers`: the WebRTC sessions."""
    r = app[REGISTRY] = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    GCCollector(registry=r)
    Gauge("lipsync_gateway_sessions", "Open WebSocket sessions.", registry=r).set_function(
        lambda: len(sockets)
    )
    Gauge(
        "lipsync_gateway_webrtc_sessions", "Open WebRTC sessions (peer connections).", registry=r
    ).set_function(lambda: len(peers))
    requests = Counter(
        "lipsync_gateway_requests",
        "HTTP requests by route (the route's pattern, not the path) and status.",
        ["route", "status"],
        registry=r,
    )

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            requests.labels(route, str(exc.status)).inc()
            raise
        requests.labels(route, str(response.status)).inc()
        return response

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(request.app[REGISTRY])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.middlewares.append(count)
    app.router.add_get("/metrics", metrics)
