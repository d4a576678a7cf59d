"""The gateway's HTTP application: the page, the avatar list, health, metrics and the
WebSocket route (`create_app`). Routes and protocols: docs/DELIVERY.md."""

from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path

import grpc
from aiohttp import WSCloseCode, web

from lipsync.config import WebConfig
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.channel import message_options
from lipsync.web.gateway_metrics import add_metrics
from lipsync.web.origin_checks import header_api_key, origin_allowed
from lipsync.web.upstream import HTTP_STATUS, list_models, rpc_message
from lipsync.web.ws_protocol import MAX_WS_MESSAGE_BYTES
from lipsync.web.ws_session import WebSocketSession

log = logging.getLogger("lipsync.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_SERVER = WebConfig().compositing_address
MAX_MESSAGE_BYTES = 64 << 20  # gRPC messages (a frame is one JPEG + 1280 bytes of audio)

CHANNEL = web.AppKey("channel", grpc.aio.Channel)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
SERVER = web.AppKey("server", str)
ORIGINS = web.AppKey("allowed_origins", tuple)
MAX_SESSIONS = web.AppKey("max_sessions", int)


def stub(app: web.Application) -> cpb_grpc.CompositingServiceStub:
    return cpb_grpc.CompositingServiceStub(app[CHANNEL])


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "server": request.app[SERVER]})


async def models(request: web.Request) -> web.Response:
    key = header_api_key(request.headers.get("Authorization"))
    try:
        resp = await list_models(stub(request.app), key, 10.0)
    except grpc.aio.AioRpcError as exc:
        status = HTTP_STATUS.get(exc.code(), 502)
        return web.json_response({"error": rpc_message(exc, request.app[SERVER])}, status=status)
    return web.json_response(
        [
            {
                "model_id": m.model_id,
                "loaded": m.loaded,
                "frames_cached": m.frames_cached,
                "frame_count": m.frame_count,
                "frame_width": m.frame_width,
                "frame_height": m.frame_height,
                "fps": m.fps,
            }
            for m in resp.models
        ]
    )


async def websocket(request: web.Request) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, request.app[ORIGINS]):
        log.info("refused a WebSocket from origin %r", origin[:200] if origin else origin)
        return web.json_response({"error": "origin not allowed"}, status=403)
    if len(request.app[SOCKETS]) >= request.app[MAX_SESSIONS]:
        return web.json_response({"error": "too many sessions"}, status=503)
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_WS_MESSAGE_BYTES)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    try:
        await WebSocketSession(ws, stub(request.app), request.app[SERVER]).run()
    finally:
        request.app[SOCKETS].discard(ws)
    return ws


def create_app(
    server: str = DEFAULT_SERVER,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    allowed_origins: tuple[str, ...] | list[str] = (),
    max_sessions: int = WebConfig().max_sessions,
) -> web.Application:
    """The gateway for the compositing service at `server` (host:port), over TLS with
    `credentials`; WebSockets from the page's own origin and `allowed_origins`, at most
    `max_sessions` at a time."""
    app = web.Application(client_max_size=1 << 20)  # HTTP request bodies (none are used)
    app[SERVER] = server
    app[SOCKETS] = weakref.WeakSet()
    app[ORIGINS] = tuple(allowed_origins)
    app[MAX_SESSIONS] = max_sessions

    async def open_channel(app: web.Application) -> None:
        options = message_options(MAX_MESSAGE_BYTES)
        if credentials is None:
            app[CHANNEL] = grpc.aio.insecure_channel(server, options=options)
        else:
            app[CHANNEL] = grpc.aio.secure_channel(server, credentials, options=options)

    async def close_sockets(app: web.Application) -> None:
        for ws in list(app[SOCKETS]):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def close_channel(app: web.Application) -> None:
        await app[CHANNEL].close()

    app.on_startup.append(open_channel)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(close_channel)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/models", models)
    app.router.add_get("/ws", websocket)
    app.router.add_static("/static/", STATIC_DIR)
    add_metrics(app, app[SOCKETS])  # GET /metrics (lipsync/web/gateway_metrics.py)
    return app


__all__ = ["DEFAULT_SERVER", "STATIC_DIR", "create_app"]
