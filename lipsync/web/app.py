"""The gateway's HTTP application: the page, the avatar list, health, metrics and the
WebSocket route (`create_app`). Routes and protocols: docs/DELIVERY.md."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from pathlib import Path

import grpc
from aiohttp import WSCloseCode, web

from lipsync.config import WebConfig
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.bearer import bearer_token
from lipsync.rpc.channel import message_options
from lipsync.web.gateway_metrics import add_metrics
from lipsync.web.origin_checks import origin_allowed
from lipsync.web.upstream import HTTP_STATUS, list_models, rpc_message
from lipsync.web.webrtc_session import (
    MAX_OFFER_BYTES,
    OfferError,
    WebRtcSession,
    parse_offer,
)
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
PEERS = web.AppKey("webrtc_peers", set)
MAX_PEERS = web.AppKey("webrtc_max_sessions", int)
ICE_SERVERS = web.AppKey("ice_servers", list)


def stub(app: web.Application) -> cpb_grpc.CompositingServiceStub:
    return cpb_grpc.CompositingServiceStub(app[CHANNEL])


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "server": request.app[SERVER]})


async def models(request: web.Request) -> web.Response:
    key = bearer_token(request.headers.get("Authorization"))
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


def _ice_servers(urls: list[str], username: str, credential: str) -> list[dict]:
    """RTCIceServer dictionaries (for the page's RTCPeerConnection and aiortc's): STUN
    URLs alone, TURN URLs with the credentials."""
    stun = [u for u in urls if u.startswith(("stun:", "stuns:"))]
    turn = [u for u in urls if u.startswith(("turn:", "turns:"))]
    other = set(urls) - set(stun) - set(turn)
    if other:
        raise ValueError(f"ICE server URLs must start with stun:, stuns:, turn: or turns:: {other}")
    servers: list[dict] = [{"urls": stun}] if stun else []
    if turn:
        servers.append({"urls": turn, "username": username, "credential": credential})
    return servers


async def webrtc_config(request: web.Request) -> web.Response:
    """What the page's RTCPeerConnection needs: the ICE servers."""
    return web.json_response({"ice_servers": request.app[ICE_SERVERS]})


def _offer_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def webrtc_offer(request: web.Request) -> web.Response:
    """POST /webrtc/offer: JSON `{sdp, type: "offer", model_id, key?}` -> `{sdp, type:
    "answer"}`; a refused offer gets a 4xx (5xx: the service failed) with `{error}` and
    leaves nothing behind."""
    app = request.app
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, app[ORIGINS]):
        log.info("refused an offer from origin %r", origin[:200] if origin else origin)
        return _offer_error(403, "origin not allowed")
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        return _offer_error(413, f"the offer is larger than {MAX_OFFER_BYTES} bytes")
    if len(app[PEERS]) >= app[MAX_PEERS]:
        return _offer_error(503, "too many WebRTC sessions")
    try:
        raw = await request.content.read(MAX_OFFER_BYTES + 1)
    except (ConnectionError, web.HTTPException):
        return _offer_error(400, "the offer could not be read")
    if len(raw) > MAX_OFFER_BYTES:
        return _offer_error(413, f"the offer is larger than {MAX_OFFER_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _offer_error(400, "the offer is not JSON")
    try:
        offer = parse_offer(body)
    except OfferError as exc:
        return _offer_error(exc.status, str(exc))
    try:
        listed = await list_models(stub(app), offer.api_key, 10.0)
    except grpc.aio.AioRpcError as exc:
        return _offer_error(HTTP_STATUS.get(exc.code(), 502), rpc_message(exc, app[SERVER]))
    info = next((m for m in listed.models if m.model_id == offer.model_id), None)
    if info is None:
        return _offer_error(404, f"unknown model {offer.model_id!r}")
    if len(app[PEERS]) >= app[MAX_PEERS]:  # others came while this one was checked
        return _offer_error(503, "too many WebRTC sessions")
    session = WebRtcSession(
        stub(app),
        offer,
        fps=float(info.fps or 25),
        ice_servers=app[ICE_SERVERS],
        on_closed=app[PEERS].discard,
    )
    app[PEERS].add(session)
    try:
        answer = await session.open()
    except OfferError as exc:
        app[PEERS].discard(session)
        return _offer_error(exc.status, str(exc))
    log.info("webrtc %s: answered (%d sessions)", offer.model_id, len(app[PEERS]))
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


def create_app(
    server: str = DEFAULT_SERVER,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    allowed_origins: tuple[str, ...] | list[str] = (),
    max_sessions: int = WebConfig().max_sessions,
    webrtc_max_sessions: int = WebConfig().webrtc_max_sessions,
    ice_servers: list[str] | tuple[str, ...] = (),
    ice_username: str = "",
    ice_credential: str = "",
) -> web.Application:
    """The gateway for the compositing service at `server` (host:port), over TLS with
    `credentials`; WebSockets and WebRTC offers from the page's own origin and
    `allowed_origins`, at most `max_sessions` WebSockets and `webrtc_max_sessions` peer
    connections at a time; `ice_servers` (STUN/TURN URLs) for both ends of WebRTC."""
    app = web.Application(client_max_size=1 << 20)  # HTTP request bodies (offers: 64 KiB)
    app[SERVER] = server
    app[SOCKETS] = weakref.WeakSet()
    app[ORIGINS] = tuple(allowed_origins)
    app[MAX_SESSIONS] = max_sessions
    app[PEERS] = set()
    app[MAX_PEERS] = webrtc_max_sessions
    app[ICE_SERVERS] = _ice_servers(list(ice_servers), ice_username, ice_credential)

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

    async def close_peers(app: web.Application) -> None:
        await asyncio.gather(*(p.close() for p in list(app[PEERS])), return_exceptions=True)

    async def close_channel(app: web.Application) -> None:
        await app[CHANNEL].close()

    app.on_startup.append(open_channel)
    app.on_shutdown.append(close_sockets)
    app.on_shutdown.append(close_peers)
    app.on_cleanup.append(close_channel)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/models", models)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/webrtc", webrtc_config)
    app.router.add_post("/webrtc/offer", webrtc_offer)
    app.router.add_static("/static/", STATIC_DIR)
    add_metrics(app, app[SOCKETS], app[PEERS])  # GET /metrics (lipsync/web/gateway_metrics.py)
    return app


__all__ = ["DEFAULT_SERVER", "STATIC_DIR", "create_app"]
