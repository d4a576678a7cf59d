"""Browser gateway: a web page and a WebSocket bridge to the compositing service's
StreamComposite (`python -m lipsync.web`, port 8080 by default).

Routes
------
- `GET /`            the page (`static/index.html`); `GET /static/...` its assets
- `GET /api/models`  JSON list of the avatars (the compositing service's ListModels):
                     `[{"model_id", "loaded", "frames_cached", "frame_count",
                     "frame_width", "frame_height", "fps"}, ...]`
- `GET /healthz`     `{"ok": true}` (the gateway process is up; says nothing of the services)
- `GET /ws`          WebSocket, one streaming session per socket (protocol below)

WebSocket protocol
------------------
Page -> gateway:

1. First message, text: `{"type": "start", "model": "<model_id>", "sample_rate": <Hz>,
   "realtime": true, "start_frame_idx": 0}`. `sample_rate` is the rate of the audio the
   page sends (its AudioContext rate; 0 means 16000); `realtime` (default true) paces the
   frames at the avatar's fps with idle frames between speech; `start_frame_idx` is
   optional. The gateway opens StreamComposite with `return_audio=true` and answers
   `{"type": "started", "model": ...}`.
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
- text `{"type": "error", "message": "..."}`, then a close (1008 for a bad message from
  the page, 1011 for an error of the compositing service, e.g. an unknown model);
- text `{"type": "end"}` when the stream ended normally, then a close (1000).

Closing the socket cancels the gRPC stream.

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
from lipsync.grpc_util import message_options
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc

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


def _rpc_message(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {exc.details() or 'compositing service error'}"


class _Session:
    """One WebSocket bridged to one StreamComposite call."""

    def __init__(self, ws: web.WebSocketResponse, stub: cpb_grpc.CompositingServiceStub):
        self.ws = ws
        self.stub = stub
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

    async def finish(self, code: int, error: str | None = None) -> None:
        """Send the error (or the end message) and close the socket, once."""
        if self.closing:
            return
        self.closing = True
        if error is not None:
            log.info("session %s: %s", self.model or "-", error)
            await self.send_json({"type": "error", "message": error})
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
        self.call = self.stub.StreamComposite()
        t0 = time.monotonic()
        pump = asyncio.create_task(self._pump_frames())
        try:
            await self.call.write(cpb.StreamRequest(start=start))
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
            await self.finish(WSCloseCode.INTERNAL_ERROR, _rpc_message(exc))
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not self.call.cancelled():
                raise
            return  # run() cancelled the call because the page went away
        await self.finish(WSCloseCode.OK)


def _stub(request: web.Request) -> cpb_grpc.CompositingServiceStub:
    return cpb_grpc.CompositingServiceStub(request.app[CHANNEL])


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "server": request.app[SERVER]})


async def models(request: web.Request) -> web.Response:
    try:
        resp = await _stub(request).ListModels(cpb.ListModelsRequest(), timeout=10.0)
    except grpc.aio.AioRpcError as exc:
        return web.json_response({"error": _rpc_message(exc)}, status=502)
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


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_WS_MESSAGE_BYTES)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    try:
        await _Session(ws, _stub(request)).run()
    finally:
        request.app[SOCKETS].discard(ws)
    return ws


def create_app(server: str = DEFAULT_SERVER) -> web.Application:
    """The gateway for the compositing service at `server` (host:port)."""
    app = web.Application()
    app[SERVER] = server
    app[SOCKETS] = weakref.WeakSet()

    async def open_channel(app: web.Application) -> None:
        app[CHANNEL] = grpc.aio.insecure_channel(server, options=message_options(MAX_MESSAGE_BYTES))

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
    return app


def parse_args(argv: list[str] | None = None, env: Mapping[str, str] | None = None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", help="YAML config file (default: $LIPSYNC_CONFIG)")
    known, _ = pre.parse_known_args(argv)
    cfg = load_config(known.config, env=os.environ if env is None else env).web
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
        create_app(args.server),
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
