"""A WebRTC viewer in Python (aiortc), for the tests and benchmarks/webrtc.py: it sends an
audio signal as its microphone track in real time, and records the avatar's decoded video
frames, its sound and the per-frame metadata of the gateway's data channel."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48000
CHUNK = 960  # 20 ms


class SignalTrack(MediaStreamTrack):
    """A microphone playing `signal` (float32 mono at 48 kHz) in real time, then silence;
    `emitted[k]` is the wall clock (time.time()) when chunk k (samples k*960...) left."""

    kind = "audio"

    def __init__(self, signal: np.ndarray, stall_after_s: float | None = None):
        super().__init__()
        self.signal = np.clip(signal, -1, 1)
        self.stall_after = None if stall_after_s is None else int(stall_after_s * RATE)
        self.sample = 0
        self.t0: float | None = None
        self.emitted: list[float] = []

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
        if self.stall_after is not None and self.sample >= self.stall_after:
            await asyncio.Event().wait()  # a page whose audio stopped, connection open
        due = self.t0 + self.sample / RATE
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.signal[self.sample : self.sample + CHUNK]
        if len(chunk) < CHUNK:
            chunk = np.concatenate([chunk, np.zeros(CHUNK - len(chunk), np.float32)])
        pcm = np.rint(chunk * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.sample
        frame.time_base = fractions.Fraction(1, RATE)
        self.sample += CHUNK
        self.emitted.append(time.time())
        return frame


@dataclass
class Viewer:
    """One viewer's session with a gateway at `base` (http://host:port)."""

    base: str
    model: str
    signal: np.ndarray
    key: str | None = None
    keep_frames: bool = True
    stall_after_s: float | None = None  # the microphone stops sending then
    pc: RTCPeerConnection | None = None
    mic: SignalTrack | None = None
    channel: Any = None
    video: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, pts, w, h
    images: list[np.ndarray] = field(default_factory=list)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # t, mono 48 kHz
    meta: list[dict[str, Any]] = field(default_factory=list)
    answer: str = ""
    tasks: list[asyncio.Task] = field(default_factory=list)
    # RTP timestamp -> wall clock when its last packet arrived (video: the marker packet,
    # i.e. the frame complete; audio: the packet), before aiortc's jitter buffers
    video_complete: dict[int, float] = field(default_factory=dict)
    audio_arrived: dict[int, float] = field(default_factory=dict)

    async def connect(self, http: aiohttp.ClientSession) -> None:
        pc = self.pc = RTCPeerConnection()
        self.mic = SignalTrack(self.signal, self.stall_after_s)
        audio = pc.addTransceiver(self.mic, direction="sendrecv")
        video = pc.addTransceiver("video", direction="recvonly")
        self._note_arrivals(audio.receiver, self.audio_arrived, marker_only=False)
        self._note_arrivals(video.receiver, self.video_complete, marker_only=True)
        self.channel = pc.createDataChannel("control")

        @self.channel.on("message")
        def on_message(msg: Any) -> None:
            if isinstance(msg, str):
                obj = json.loads(msg)
                obj["recv_wall"] = time.time()
                self.meta.append(obj)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tasks.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "model_id": self.model}
        if self.key:
            body["key"] = self.key
        async with http.post(f"{self.base}/webrtc/offer", json=body) as resp:
            obj = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"offer refused: {resp.status} {obj}")
        self.answer = obj["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=obj["sdp"], type=obj["type"]))

    @staticmethod
    def _note_arrivals(receiver: Any, into: dict[int, float], marker_only: bool) -> None:
        """Measurement only: when packets arrive, seen by wrapping aiortc's receiver's
        packet handler (aiortc's video jitter buffer releases a frame only when the next
        frame's first packet arrives, 40 ms later; a browser decodes on the marker)."""
        handle = receiver._handle_rtp_packet

        async def noted(packet: Any, arrival_time_ms: int) -> None:
            if packet.marker or not marker_only:
                into[packet.timestamp] = time.time()
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = noted

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.time()
                if track.kind == "video":
                    self.video.append((now, int(frame.pts), frame.width, frame.height))
                    if self.keep_frames:
                        self.images.append(frame.to_ndarray(format="rgb24"))
                else:
                    n = len(frame.layout.channels)  # packed s16: interleaved channels
                    x = frame.to_ndarray().astype(np.float32).reshape(-1, n)
                    self.audio.append((now, x.mean(axis=1) / 32768))
        except MediaStreamError:
            pass

    def send(self, obj: dict[str, Any]) -> None:
        self.channel.send(json.dumps(obj))

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def complete_time(self, pts: int) -> float | None:
        """When the decoded frame with this pts was complete at the viewer (its marker
        packet arrived). aiortc's receiver numbers decoded frames from the first RTP
        timestamp it saw, so that one is the base."""
        if not self.video_complete:
            return None
        base = next(iter(self.video_complete))  # dicts keep the arrival order
        return self.video_complete.get((pts + base) % (1 << 32))

    def frames_meta(self) -> list[dict[str, Any]]:
        return [m for m in self.meta if m.get("type") == "frame"]

    def matched(self) -> list[tuple[tuple[float, int, int, int], dict[str, Any]]]:
        """Decoded frames paired with the metadata of the frame sent: the first decoded
        frame is the first sent (a keyframe); every later pair must keep the pts
        difference (RTP timestamps, 90 kHz) or the pairing stops there."""
        meta = self.frames_meta()
        if not self.video or not meta:
            return []
        r0, p0 = self.video[0][1], meta[0]["pts_ms"]
        by_pts = {round(m["pts_ms"] - p0, 3): m for m in meta}
        pairs = []
        for v in self.video:
            d = round(((v[1] - r0) % (1 << 32)) / 90.0, 3)
            m = by_pts.get(d)
            if m is None:
                break
            pairs.append((v, m))
        return pairs
