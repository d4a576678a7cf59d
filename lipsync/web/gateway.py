"""Browser gateway: a web page and a WebSocket bridge to the compositing service's
StreamComposite (`python -m lipsync.web`, port 8080 by default).

Routes
------
- `GET /`            the page (`static/index.html`); `GET /static/...` its assets
- `GET /api/models`  JSON list of the avatars (the compositing service's ListModels):
                     `[{"model_id", "loaded", "frames_cached", "frame_count",
                     "frame_width", "frame_height", "fps"}, ...]`
- `GET /healthz`     `{"ok": true}` (the gateway process is up; says nothing of the services)
- `GET /metrics`     Prometheus metrics of the gateway (lipsync/web/metrics.py)
- `GET /ws`          WebSocket, one streaming session per socket (protocol below)

WebSocket protocol
------------------
Page -> gateway:

1. First message, text: `{"type": "start", "model": "<model_id>", "sample_rate": <Hz>,
   "realtime": true, "start_frame_idx": 0}`. `sample_rate` is the rate of the audio the
   page sends (its AudioContext rate; 0 means 16000); `realtime` (default true) paces the
   frames at the avatar's fps with idle frames between speech; `start_frame_idx` is
   optional; `"api_key": "<key>"` when the compositing service requires keys (sent to it
   as `authorization: Bearer`, never logged). The gateway opens StreamComposite with
   `return_audio=true` and answers `{"type": "started", "model": ...}` once the service
   accepted the stream (a refused key, an unknown model or a full service end the
   socket with an error instead).
2. Binary messages: mono PCM, float32 little-endian, any length (the page sends 20 ms).
3. Text controls:
   - `{"type": "end_of_audio"}`: the current clip is complete (flush its frames);
   - `{"type": "interrupt"}`: drop the queued speech now (back to idle frames);
   - `{"type": "ping", "t": <any>}`: answered at once by
     `{"type": "pong", "t": <same>, "server_ms": <gateway wall clock, ms>}`;
   - `{"type": "stop"}`: no more audio; the gateway half-closes the gRPC stream, sends the
     remaining frames, then `{"type": "end"}` and closes the socket (code 1000).

Gateway -> page:

- one binary message per video frame:
  `[u32 LE n][n bytes of UTF-8 JSON header][audio bytes][JPEG bytes]`, header
  `{"index", "pts_ms", "speech", "generated", "clip", "clip_frame", "background_frame",
  "latency_ms", "recv_ms", "sent_ms", "audio_len", "jpeg_len", "audio_rate"}`: the
  StreamFrame's fields, `audio_len` bytes of s16le mono audio at `audio_rate` (16000 Hz;
  the frame's 40 ms, to be played when the frame is shown), then `jpeg_len` bytes of
  JPEG. `latency_ms` is the compositing service's delay from the arrival of the last audio
  the frame needed to its sending (0 for idle frames); `recv_ms` / `sent_ms` are the
  gateway's wall clock (ms since the epoch) when the frame came from gRPC and when it was
  handed to the socket, so a page on the same machine measures the WebSocket hop as
  `performance.timeOrigin + performance.now() - sent_ms`.
- text `{"type": "error", "message": "...", "code": "<gRPC status name, when the
  compositing service refused>"}`, then a close (1008 for a bad message from the page
  or a refused key / a key over its limits, 1011 for another error of the compositing
  service, e.g. an unknown model);
- text `{"type": "end"}` when the stream ended normally, then a close (1000).

Closing the socket cancels the gRPC stream.

Who may connect (docs/SECURITY.md): the gateway binds 127.0.0.1 unless `web.host` says
otherwise; `/ws` refuses (403) a browser page from another origin than the gateway's own
unless `web.allowed_origins` lists it; at most `web.max_sessions` sockets at a time (503
beyond); one session per socket; a message from the page is at most 4 MiB; the start
message must come within 30 s. `/api/models` passes an `Authorization: Bearer` header on
as the key (401 / 403 / 429 for the service's refusals).

Why a WebSocket and not WebRTC: the frames are already JPEG and carry their own audio, so a
WebSocket forwards them as they are (the gateway adds ~0.02 ms between gRPC and socket);
WebRTC would need a server-side video encoder and a media stack. Measured on loopback
(`tests/test_web.py`): gateway send -> receive 0.2 ms median with a Python client (ping
round trip 0.5 ms); in headless Chromium 2-16 ms (browser IPC and the page's busy main
thread, on a loaded 2-core machine). Either is small next to the ~450 ms lookahead of the
audio windows that every streamed frame waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import ssl
import struct
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from aiohttp import WSCloseCode, WSMsgType, web

from lipsync.config import WebConfig, load_config
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.channel import message_options
from lipsync.rpc.errors import rpc_error_message
from lipsync.rpc.tls import channel_credentials
from lipsync.serving.logs import setup_logging
from lipsync.web.metrics import add_metrics
from lipsync.web.security import (
    bearer_metadata,
    header_api_key,
    origin_allowed,
    start_api_key,
)

log = logging.getLogger("lipsync.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_SERVER = WebConfig().compositing_address
MAX_MESSAGE_BYTES = 64 << 20  # gRPC messages (a frame is one JPEG + 1280 bytes of audio)
MAX_WS_MESSAGE_BYTES = 4 << 20  # one audio chunk from the page
START_TIMEOUT_S = 30.0
AUDIO_RATE = 16000
HEADER_LEN = struct.Struct("<I")

CHANNEL = web.AppKey("channel", grpc.aio.Channel)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
SERVER = web.AppKey("server", str)
ORIGINS = web.AppKey("allowed_origins", tuple)
MAX_SESSIONS = web.AppKey("max_sessions", int)
# Refusals of the compositing service that are the caller's to fix: close 1008 (policy).
POLICY_CODES = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


class ProtocolError(ValueError):
    """The page sent something the protocol does not allow; the message says what."""


def wall_ms() -> float:
    return time.time() * 1000.0


def pack_frame(frame: cpb.StreamFrame, recv_ms: float) -> bytes:
    """One StreamFrame as the binary WebSocket message described in the module docstring."""
    pcm, jpeg = frame.audio, frame.jpeg  # each read of a bytes field copies it
    header = {
        "index": frame.index,
        "pts_ms": frame.pts_ms,
        "speech": frame.speech,
        "generated": frame.generated,
        "clip": frame.clip,
        "clip_frame": frame.clip_frame,
        "background_frame": frame.background_frame,
        "latency_ms": round(float(frame.latency_ms), 3),
        "recv_ms": round(recv_ms, 3),
        "sent_ms": round(wall_ms(), 3),
        "audio_len": len(pcm),
        "jpeg_len": len(jpeg),
        "audio_rate": AUDIO_RATE,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((HEADER_LEN.pack(len(head)), head, pcm, jpeg))


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, s16le audio, JPEG) of a binary frame message."""
    (n,) = HEADER_LEN.unpack_from(data)
    header = json.loads(data[4 : 4 + n])
    a = 4 + n
    j = a + header["audio_len"]
    if j + header["jpeg_len"] != len(data):
        raise ValueError("frame message length does not match its header")
    return header, data[a:j], data[j:]


def parse_start(msg: Any) -> cpb.StreamStart:
    """The StreamStart of the page's first message (a JSON text message)."""
    if not isinstance(msg, str):
        raise ProtocolError('the first message must be the text message {"type": "start", ...}')
    try:
        obj = json.loads(msg)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"the start message is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("type") != "start":
        raise ProtocolError('the first message must be {"type": "start", ...}')
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("start: 'model' must be a non-empty string")

    def integer(key: str, default: int) -> int:
        v = obj.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
            raise ProtocolError(f"start: '{key}' must be a non-negative integer, got {v!r}")
        return v

    realtime = obj.get("realtime", True)
    if not isinstance(realtime, bool):
        raise ProtocolError("start: 'realtime' must be true or false")
    return cpb.StreamStart(
        model_id=model,
        sample_rate=integer("sample_rate", 0),
        start_frame_idx=integer("start_frame_idx", 0),
        realtime=realtime,
        audio_encoding=cpb.PCM_F32LE,
        return_audio=True,
    )


def _rpc_message(exc: grpc.aio.AioRpcError, server: str) -> str:
    return rpc_error_message(exc, "compositing service", server)


class _Session:
    """One WebSocket bridged to one StreamComposite call."""

    def __init__(
        self, ws: web.WebSocketResponse, stub: cpb_grpc.CompositingServiceStub, server: str
    ):
        self.ws = ws
        self.stub = stub
        self.server = server
        self.lock = asyncio.Lock()
        self.call: Any = None
        self.closing = False
        self.input_done = False
        self.frames = 0
        self.model = ""

    async def send(self, data: bytes | str) -> bool:
        async with self.lock:
            if self.ws.closed:
                return False
            try:
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(data)
            except (ConnectionError, RuntimeError):
                return False
        return True

    async def send_json(self, obj: dict[str, Any]) -> bool:
        return await self.send(json.dumps(obj))

    async def finish(
        self, code: int, error: str | None = None, rpc_code: grpc.StatusCode | None = None
    ) -> None:
        """Send the error (or the end message) and close the socket, once."""
        if self.closing:
            return
        self.closing = True
        if error is not None:
            log.info("session %s: %s", self.model or "-", error)
            msg = {"type": "error", "message": error}
            if rpc_code is not None:
                msg["code"] = rpc_code.name
            await self.send_json(msg)
        else:
            await self.send_json({"type": "end"})
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code)

    async def run(self) -> None:
        try:
            msg = await self.ws.receive(timeout=START_TIMEOUT_S)
        except TimeoutError:
            await self.finish(WSCloseCode.POLICY_VIOLATION, "no start message")
            return
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return
        try:
            start = parse_start(msg.data if msg.type == WSMsgType.TEXT else None)
        except ProtocolError as exc:
            await self.finish(WSCloseCode.POLICY_VIOLATION, str(exc))
            return
        self.model = start.model_id
        key = start_api_key(msg.data)
        if not await self._key_accepted(key):
            return
        self.call = self.stub.StreamComposite(metadata=bearer_metadata(key))
        t0 = time.monotonic()
        pump = asyncio.create_task(self._pump_frames())
        try:
            await self.call.write(cpb.StreamRequest(start=start))
            # "started" only once the service accepted the stream (its headers came):
            # a refused key, an unknown model or a full service end the call instead,
            # and the pump reports that.
            await asyncio.wait_for(self.call.initial_metadata(), START_TIMEOUT_S)
            if self.call.done() and await self.call.code() != grpc.StatusCode.OK:
                return
            await self.send_json({"type": "started", "model": start.model_id})
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self._audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self._control(msg.data)
                else:  # ERROR
                    break
                if self.closing:
                    break
        except ProtocolError as exc:
            await self.finish(WSCloseCode.POLICY_VIOLATION, str(exc))
        except TimeoutError:
            await self.finish(
                WSCloseCode.INTERNAL_ERROR, "the compositing service did not accept the stream"
            )
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the call ended; the pump reports how
        finally:
            # The socket is closed (by the page, or after an error or the end): end the
            # gRPC stream if it still runs, and let the pump finish its own close.
            if not pump.done():
                self.call.cancel()
            await asyncio.wait({pump}, timeout=5.0)
            if not pump.done():
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            log.info(
                "session %s: %d frames in %.1f s", self.model, self.frames, time.monotonic() - t0
            )

    async def _write(self, req: cpb.StreamRequest) -> None:
        if self.input_done:
            raise ProtocolError("no messages but ping may follow stop")
        if self.call.done():
            return
        await self.call.write(req)

    async def _audio(self, data: bytes) -> None:
        if len(data) % 4:
            raise ProtocolError(f"audio message of {len(data)} bytes is not float32 samples")
        if data:
            await self._write(cpb.StreamRequest(audio=data))

    async def _control(self, text: str) -> None:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"control message is not JSON: {exc}") from exc
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "ping":
            await self.send_json({"type": "pong", "t": obj.get("t"), "server_ms": wall_ms()})
        elif kind == "end_of_audio":
            await self._write(cpb.StreamRequest(end_of_audio=True))
        elif kind == "interrupt":
            await self._write(cpb.StreamRequest(interrupt=True))
        elif kind == "stop":
            if not self.input_done and not self.call.done():
                await self.call.done_writing()
            self.input_done = True
        elif kind == "start":
            raise ProtocolError("start may only be the first message")
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    async def _key_accepted(self, key: str | None) -> bool:
        """Check the page's key (or its absence) with one cheap call before the stream
        opens: a refusal of the stream itself can race with the start message the gateway
        writes, and gRPC then reports an internal error instead of the refusal."""
        try:
            await self.stub.ListModels(
                cpb.ListModelsRequest(), metadata=bearer_metadata(key), timeout=START_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in POLICY_CODES:
                await self.finish(
                    WSCloseCode.POLICY_VIOLATION, _rpc_message(exc, self.server), exc.code()
                )
                return False
        return True  # other failures: the stream's own attempt reports them

    async def _pump_frames(self) -> None:
        """gRPC frames -> WebSocket, then the end or error message and the close."""
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                recv = wall_ms()
                if not await self.send(pack_frame(frame, recv)):
                    return  # the socket is gone; run() cancels the call
                self.frames += 1
        except grpc.aio.AioRpcError as exc:
            close = (
                WSCloseCode.POLICY_VIOLATION
                if exc.code() in POLICY_CODES
                else WSCloseCode.INTERNAL_ERROR
            )
            await self.finish(close, _rpc_message(exc, self.server), exc.code())
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not self.call.cancelled():
                raise
            return  # run() cancelled the call because the page went away
        await self.finish(WSCloseCode.OK)


HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


def _stub(request: web.Request) -> cpb_grpc.CompositingServiceStub:
    return cpb_grpc.CompositingServiceStub(request.app[CHANNEL])


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "server": request.app[SERVER]})


async def models(request: web.Request) -> web.Response:
    key = header_api_key(request.headers.get("Authorization"))
    try:
        resp = await _stub(request).ListModels(
            cpb.ListModelsRequest(), timeout=10.0, metadata=bearer_metadata(key)
        )
    except grpc.aio.AioRpcError as exc:
        status = HTTP_STATUS.get(exc.code(), 502)
        return web.json_response({"error": _rpc_message(exc, request.app[SERVER])}, status=status)
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
        await _Session(ws, _stub(request), request.app[SERVER]).run()
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
    add_metrics(app, app[SOCKETS])  # GET /metrics (lipsync/web/metrics.py)
    return app


def parse_args(argv: list[str] | None = None, env: Mapping[str, str] | None = None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    known, _ = pre.parse_known_args(argv)
    full = load_config(known.config, env=os.environ if env is None else env)
    cfg = full.web
    ap = argparse.ArgumentParser(
        prog="python -m lipsync.web",
        parents=[pre],
        description="Serve the lip-sync web page and its WebSocket gateway. Defaults come "
        "from the config's `web` section (LIPSYNC_WEB__PORT, COMPOSITING_ADDRESS, ...).",
    )
    ap.add_argument("--port", type=int, default=cfg.port, help="HTTP port (default %(default)s)")
    ap.add_argument(
        "--server",
        default=cfg.compositing_address,
        help="compositing service host:port (default %(default)s)",
    )
    ap.add_argument("--host", default=cfg.host, help="bind address (default %(default)s)")
    ap.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--keyfile", help="private key of --certfile (PEM)")
    tls = cfg.compositing_tls
    ap.add_argument(
        "--ca", default=tls.ca_file, help="TLS to the compositing service: its CA (PEM)"
    )
    ap.add_argument("--cert", default=tls.cert_file, help="client certificate (PEM), mutual TLS")
    ap.add_argument("--key", default=tls.key_file, help="private key (PEM) of --cert")
    ap.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        default=None,
        help="an origin (scheme://host[:port]) whose pages may open /ws besides the "
        "page's own; repeatable; '*': any (default: web.allowed_origins)",
    )
    ap.add_argument(
        "--max-sessions",
        type=int,
        default=cfg.max_sessions,
        help="concurrent WebSocket sessions (default %(default)s)",
    )
    args = ap.parse_args(argv)
    if args.allowed_origins is None:
        args.allowed_origins = list(cfg.allowed_origins)
    args.log_level, args.log_format = full.log_level, full.log_format  # lipsync.serving.logs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format, "web")
    ssl_ctx = None
    if args.certfile:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.certfile, args.keyfile)
    scheme = "https" if ssl_ctx else "http"
    shown = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    log.info(
        "serving %s://%s:%d/ (compositing service at %s)", scheme, shown, args.port, args.server
    )
    web.run_app(
        create_app(
            args.server,
            credentials=channel_credentials(args.ca, args.cert, args.key),
            allowed_origins=args.allowed_origins,
            max_sessions=args.max_sessions,
        ),
        host=args.host,
        port=args.port,
        ssl_context=ssl_ctx,
        print=None,
        access_log=None,
    )
    return 0


__all__ = [
    "DEFAULT_SERVER",
    "STATIC_DIR",
    "ProtocolError",
    "create_app",
    "main",
    "pack_frame",
    "parse_args",
    "parse_start",
    "unpack_frame",
]
