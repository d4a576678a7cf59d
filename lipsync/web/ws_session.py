"""One WebSocket session: the page's socket bridged to one StreamComposite call
(the protocol: lipsync/web/ws_protocol.py and docs/DELIVERY.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import grpc
from aiohttp import WSCloseCode, WSMsgType, web

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.bearer import bearer_metadata
from lipsync.web.origin_checks import start_api_key
from lipsync.web.upstream import POLICY_CODES, key_refusal, rpc_message
from lipsync.web.ws_protocol import (
    START_TIMEOUT_S,
    ProtocolError,
    pack_frame,
    parse_start,
    wall_ms,
)

log = logging.getLogger("lipsync.web")


class WebSocketSession:
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
        refused = await key_refusal(self.stub, key, START_TIMEOUT_S)
        if refused is not None:
            await self.finish(
                WSCloseCode.POLICY_VIOLATION, rpc_message(refused, self.server), refused.code()
            )
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
            await self.finish(close, rpc_message(exc, self.server), exc.code())
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not self.call.cancelled():
                raise
            return  # run() cancelled the call because the page went away
        await self.finish(WSCloseCode.OK)
