"""WebRTC viewers: the offer's checks, and one peer connection bridged to one
StreamComposite call (docs/DELIVERY.md, "WebRTC in the browser").

Up: the page's microphone (or file) as an Opus audio track; aiortc decodes it to 48 kHz
and the session forwards it as float32 PCM. Down: the avatar's H.264 passed through
(lipsync/web/webrtc_media.py) and its sound, Opus. A data channel `control` carries the
page's controls (interrupt, end_of_audio, ping) and, per frame sent, its metadata.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import av
import grpc
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.bearer import bearer_metadata
from lipsync.web.webrtc_media import (
    H264_PROFILE_LEVEL_ID,
    AvatarAudioTrack,
    AvatarVideoTrack,
    PtsClock,
)
from lipsync.web.ws_protocol import wall_ms

log = logging.getLogger("lipsync.web")

MAX_OFFER_BYTES = 64 << 10  # the JSON body of an offer
MAX_SDP_CHARS = 32 << 10
MIC_RATE = 48000  # aiortc's Opus decoder's rate: the rate StreamStart announces
# No audio from the page for this long: the peer is gone (a page always sends its track,
# silence included), even if ICE has not noticed yet.
PEER_SILENT_S = 5.0
START_TIMEOUT_S = 30.0
# The page's track never stops (a browser sends silence too): audio below this level
# (RMS, -50 dBFS: the service's own `speech` threshold) for HANGOVER_S ends the clip
# (end_of_audio) and is not sent on, so a quiet viewer costs the idle frames only; the
# next sound opens a new clip with PREROLL_S of what came before it.
SILENCE_RMS = 10 ** (-50 / 20)
HANGOVER_S = 0.5
PREROLL_S = 0.2


class SilenceGate:
    """Which of the page's audio goes up: `push(chunk)` returns the chunks to send (float32
    mono at `rate`) and whether the clip ended before them (silence after sound)."""

    def __init__(self, rate: int = MIC_RATE):
        self.rate = rate
        self.open = False
        self.quiet = 0  # samples of silence since the last sound (while open)
        self.held: collections.deque[np.ndarray] = collections.deque()  # the pre-roll
        self.held_samples = 0

    def push(self, chunk: np.ndarray) -> tuple[list[np.ndarray], bool]:
        loud = bool(len(chunk)) and float(np.sqrt(np.mean(chunk * chunk))) >= SILENCE_RMS
        if self.open:
            if loud:
                self.quiet = 0
                return [chunk], False
            self.quiet += len(chunk)
            if self.quiet <= HANGOVER_S * self.rate:
                return [chunk], False
            self.open = False
            self._hold(chunk)
            return [], True
        if loud:
            self.open = True
            self.quiet = 0
            out = [*self.held, chunk]
            self.held.clear()
            self.held_samples = 0
            return out, False
        self._hold(chunk)
        return [], False

    def _hold(self, chunk: np.ndarray) -> None:
        self.held.append(chunk)
        self.held_samples += len(chunk)
        while self.held and self.held_samples - len(self.held[0]) >= PREROLL_S * self.rate:
            self.held_samples -= len(self.held.popleft())


class OfferError(Exception):
    """An offer the gateway refuses: `status` is the HTTP answer, nothing was allocated."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Offer:
    sdp: str
    model_id: str
    api_key: str | None


def parse_offer(body: Any) -> Offer:
    """The checked fields of an offer's JSON body (raises OfferError 400)."""
    if not isinstance(body, dict):
        raise OfferError(400, "the offer must be a JSON object")
    unknown = set(body) - {"sdp", "type", "model_id", "key"}
    if unknown:
        raise OfferError(400, f"unknown fields: {sorted(unknown)}")
    if body.get("type") != "offer":
        raise OfferError(400, "'type' must be \"offer\"")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise OfferError(400, "'sdp' must be a non-empty string")
    if len(sdp) > MAX_SDP_CHARS:
        raise OfferError(413, f"'sdp' is longer than {MAX_SDP_CHARS} characters")
    model = body.get("model_id")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise OfferError(400, "'model_id' must be a non-empty string")
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise OfferError(400, "'key' must be a string")
    key = key.strip() if key else None
    check_sdp(sdp)
    return Offer(sdp=sdp, model_id=model, api_key=key or None)


def check_sdp(sdp: str) -> None:
    """The offer's SDP parses, and has what a viewer needs: one audio section that sends
    (the microphone) and receives (the avatar's sound), one video section that receives
    H.264 constrained baseline with packetization-mode 1, at most one data channel."""
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises anything from bad input
        raise OfferError(400, f"the SDP does not parse: {type(exc).__name__}") from None
    kinds = [m.kind for m in desc.media]
    if kinds.count("audio") != 1 or kinds.count("video") != 1:
        raise OfferError(400, "the offer needs exactly one audio and one video section")
    if kinds.count("application") > 1 or set(kinds) - {"audio", "video", "application"}:
        raise OfferError(400, "the offer has sections other than audio, video, one data channel")
    for m in desc.media:
        if m.kind == "audio" and m.direction not in ("sendrecv", None):
            raise OfferError(400, "the audio section must be sendrecv (microphone up, sound down)")
        if m.kind == "video":
            if m.direction not in ("recvonly", "sendrecv", None):
                raise OfferError(400, "the video section must receive")
            if not any(_is_our_h264(c.mimeType, c.parameters) for c in m.rtp.codecs):
                raise OfferError(
                    400,
                    "the offer's video has no H.264 constrained baseline "
                    f"(profile-level-id {H264_PROFILE_LEVEL_ID}, packetization-mode 1)",
                )
        if not m.ice.usernameFragment or not m.ice.password or not m.dtls:
            raise OfferError(400, "the offer lacks ICE credentials or a DTLS fingerprint")


def _is_our_h264(mime: str, params: dict[str, Any]) -> bool:
    return (
        mime.lower() == "video/h264"
        and str(params.get("packetization-mode")) == "1"
        and str(params.get("profile-level-id", "")).lower() == H264_PROFILE_LEVEL_ID
    )


def ice_configuration(servers: Sequence[dict[str, Any]]) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in servers
        ]
    )


class WebRtcSession:
    """One viewer: its peer connection and its StreamComposite call. `open()` answers
    the offer (or raises OfferError having released everything); the session then runs
    until the peer goes away, the stream ends, or `close()`; `on_closed` is called once."""

    def __init__(
        self,
        stub: cpb_grpc.CompositingServiceStub,
        offer: Offer,
        *,
        fps: float,
        ice_servers: Sequence[dict[str, Any]] = (),
        on_closed: Callable[[WebRtcSession], None] | None = None,
    ):
        self.stub = stub
        self.offer = offer
        self.fps = fps
        self.ice_servers = ice_servers
        self.on_closed = on_closed
        self.pc: RTCPeerConnection | None = None
        self.call: Any = None
        self.channel: Any = None
        self.clock = PtsClock()  # one send schedule for both tracks (lip sync)
        self.video = AvatarVideoTrack(self._request_keyframe, self._frame_sent, fps, self.clock)
        self.audio = AvatarAudioTrack(self.clock)
        self.tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self._closing = False
        self._input_done = False  # the page said stop: no more audio goes up
        self.mic_prefetch_cut = False
        self._writes: asyncio.Queue[cpb.StreamRequest | None] = asyncio.Queue(maxsize=256)
        self.frames = 0
        self.audio_chunks = 0
        self.t0 = time.monotonic()

    # -- setup ----------------------------------------------------------------------------
    async def open(self) -> RTCSessionDescription:
        try:
            await self._open_stream()
            return await self._answer()
        except BaseException:
            await self.close()
            raise

    async def _open_stream(self) -> None:
        start = cpb.StreamStart(
            model_id=self.offer.model_id,
            sample_rate=MIC_RATE,
            realtime=True,
            audio_encoding=cpb.PCM_F32LE,
            return_audio=True,
            video_codec=cpb.VIDEO_CODEC_H264,
        )
        self.call = self.stub.StreamComposite(metadata=bearer_metadata(self.offer.api_key))
        try:
            await self.call.write(cpb.StreamRequest(start=start))
            await asyncio.wait_for(self.call.initial_metadata(), START_TIMEOUT_S)
            if self.call.done():
                await self.call.read()  # raises the refusal
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        except TimeoutError:
            raise OfferError(504, "the compositing service did not accept the stream") from None
        self._spawn(self._writer())

    async def _answer(self) -> RTCSessionDescription:
        pc = self.pc = RTCPeerConnection(ice_configuration(self.ice_servers))
        video = pc.addTransceiver(self.video, direction="sendonly")
        h264 = [
            c
            for c in RTCRtpSender.getCapabilities("video").codecs
            if _is_our_h264(c.mimeType, c.parameters or {})
        ]
        rtx = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.name == "rtx"]
        video.setCodecPreferences(h264 + rtx)
        mic = pc.addTransceiver(self.audio, direction="sendrecv")
        self.mic_prefetch_cut = no_audio_prefetch(mic.receiver)
        # A viewer's PLI / FIR: aiortc would force its own encoder's next frame to be a
        # keyframe; the video is passed through, so the service is asked for one.
        video.sender._send_keyframe = self.video.keyframe_wanted

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._forward_mic(track))

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if self.channel is not None:
                return
            self.channel = channel
            channel.on("message", self._control)

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._request_close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=self.offer.sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises many kinds on a bad offer
            raise OfferError(400, f"the offer cannot be answered: {exc}") from None
        self._spawn(self._pump())
        self._spawn(self._watch_start())
        return pc.localDescription

    async def _watch_start(self) -> None:
        """A peer that never connects (or whose page went away after the answer) frees
        its session too."""
        await asyncio.sleep(START_TIMEOUT_S)
        if self.pc is not None and self.pc.connectionState != "connected":
            log.info("webrtc %s: not connected after %.0f s", self.offer.model_id, START_TIMEOUT_S)
            self._request_close()

    def _request_close(self) -> None:
        """Close from one of the session's own tasks: in a task of its own, which close()
        does not wait for (a task awaiting close() while close() cancels and awaits it
        would deadlock; asyncio.wait_for can swallow that cancellation)."""
        if not self._closing:
            self._spawn(self.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- up: microphone and controls --------------------------------------------------------
    def _send_request(self, req: cpb.StreamRequest | None) -> None:
        if self._closing or self._input_done:
            return
        if req is None:  # stop: the writer half-closes the stream after what is queued
            self._input_done = True
        try:
            self._writes.put_nowait(req)
        except asyncio.QueueFull:
            log.warning("webrtc %s: stream writes backed up; closing", self.offer.model_id)
            self._request_close()

    async def _writer(self) -> None:
        """The only writer of the gRPC stream (audio, controls, keyframe requests)."""
        try:
            while (req := await self._writes.get()) is not None:
                if self.call.done():
                    return
                await self.call.write(req)
            if not self.call.done():
                await self.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the call ended; the pump reports how

    async def _forward_mic(self, track: MediaStreamTrack) -> None:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=MIC_RATE)
        gate = SilenceGate(MIC_RATE)
        try:
            while True:
                frame = await asyncio.wait_for(track.recv(), PEER_SILENT_S)
                for f in resampler.resample(frame):
                    chunks, ended = gate.push(f.to_ndarray().reshape(-1).astype("<f4"))
                    if ended:
                        self._send_request(cpb.StreamRequest(end_of_audio=True))
                    for c in chunks:
                        self.audio_chunks += 1
                        self._send_request(cpb.StreamRequest(audio=c.tobytes()))
        except (MediaStreamError, TimeoutError):
            log.info("webrtc %s: the page's audio ended", self.offer.model_id)
        self._request_close()

    def _control(self, message: Any) -> None:
        try:
            obj = json.loads(message) if isinstance(message, str) else None
        except ValueError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "interrupt":
            self._send_request(cpb.StreamRequest(interrupt=True))
        elif kind == "end_of_audio":
            self._send_request(cpb.StreamRequest(end_of_audio=True))
        elif kind == "stop":  # the clip is complete; the rest of it plays, then `end`
            self._send_request(cpb.StreamRequest(end_of_audio=True))
            self._send_request(None)
        elif kind == "ping":
            self._send_channel({"type": "pong", "t": obj.get("t"), "server_ms": wall_ms()})
        else:
            self._send_channel({"type": "error", "message": f"unknown message type {kind!r}"})

    def _request_keyframe(self) -> None:
        self._send_request(cpb.StreamRequest(request_keyframe=True))

    # -- down: frames -----------------------------------------------------------------------
    def _send_channel(self, obj: dict[str, Any]) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            with contextlib.suppress(Exception):
                ch.send(json.dumps(obj, separators=(",", ":")))

    def _frame_sent(self, frame: cpb.StreamFrame) -> None:
        self._send_channel(
            {
                "type": "frame",
                "index": frame.index,
                "pts_ms": frame.pts_ms,
                "speech": frame.speech,
                "generated": frame.generated,
                "clip": frame.clip,
                "clip_frame": frame.clip_frame,
                "latency_ms": round(float(frame.latency_ms), 3),
                "sent_ms": round(wall_ms(), 3),
                "passthrough": bool(frame.h264),
            }
        )

    async def _pump(self) -> None:
        """gRPC frames -> the video and audio tracks."""
        error = None
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                self.frames += 1
                self.clock.arrived(frame.pts_ms)
                self.video.put(frame)
                self.audio.put(frame, self.fps)
        except grpc.aio.AioRpcError as exc:
            if not self._closing:
                error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            if not self._closing:
                raise
            return
        if error:
            log.info("webrtc %s: the stream ended: %s", self.offer.model_id, error)
            self._send_channel({"type": "error", "message": error})
        else:
            self._send_channel({"type": "end"})
        await asyncio.sleep(0.5)  # let the last frames leave
        self._request_close()

    # -- teardown ---------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        me = asyncio.current_task()
        try:
            if self.call is not None and not self.call.done():
                self.call.cancel()
            self.video.stop()
            self.audio.stop()
            if self.pc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pc.close(), 10)
            others = [t for t in self.tasks if t is not me]
            for t in others:
                t.cancel()
            if others:
                _, stuck = await asyncio.wait(others, timeout=5)
                for t in stuck:
                    log.warning("webrtc %s: a task did not stop: %r", self.offer.model_id, t)
        finally:
            log.info(
                "webrtc %s: closed after %d frames (%d passed through, %d encoded here), %.1f s",
                self.offer.model_id,
                self.frames,
                self.video.passthrough_frames,
                self.video.fallback_frames,
                time.monotonic() - self.t0,
            )
            self.closed.set()
            if self.on_closed is not None:
                self.on_closed(self)


def no_audio_prefetch(receiver: Any) -> bool:
    """aiortc's audio receiver holds 4 packets (80 ms) beyond the first it could decode
    before passing audio on; that buys nothing against loss (a missing packet stops the
    buffer either way) and delays every clip. Returns whether the buffer was found (an
    aiortc whose receiver differs keeps its own behaviour; tests/test_webrtc.py notices)."""
    buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
    if buffer is None or not hasattr(buffer, "_prefetch"):
        return False
    buffer._prefetch = 0
    return True


def _refusal(exc: grpc.aio.AioRpcError) -> OfferError:
    status = {
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
    }.get(exc.code(), 502)
    return OfferError(status, f"the compositing service refused the stream: {exc.details()}")
