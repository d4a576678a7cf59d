"""Publishing an H.264 stream (StreamFrame.h264) to a WHIP endpoint (RFC 9725: WebRTC
ingest over one HTTP exchange) with aiortc, without re-encoding the video: the access
units are packetised as they are; the frames' audio (s16le 16 kHz mono) is encoded to
Opus, which WebRTC requires.

WHIP: the client POSTs its SDP offer (`Content-Type: application/sdp`, an optional
bearer token), the endpoint answers `201 Created` with its SDP answer and a `Location`
header naming the session; the client DELETEs that URL to end it. The offer carries all
its ICE candidates (no trickle).

`WhipPublisher` has the `H264Muxer` interface (`write`, `close`): it runs its own asyncio
loop on a daemon thread, so the caller's thread stays synchronous. aiortc (the `whip`
extra) is imported when one is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from fractions import Fraction
from typing import Any

import numpy as np

from lipsync.client.video_out import AUDIO_RATE, VideoOutError

__all__ = ["WhipPublisher"]

VIDEO_CLOCK = Fraction(1, 90000)  # RTP's video clock
# Frames waiting for the sender; past this many the oldest go (a live stream drops, it
# does not fall behind).
MAX_QUEUED = 50
DRAIN_S = 2.0  # at close, how long queued frames may take to leave


def _aiortc() -> Any:
    try:
        import aiortc
    except ImportError as exc:
        raise VideoOutError("WHIP needs aiortc: pip install 'lipsync-serving[whip]'") from exc
    return aiortc


def _http(method: str, url: str, body: bytes | None, token: str | None, timeout: float):
    headers = {"Content-Type": "application/sdp"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode("utf-8", "replace")
        raise VideoOutError(f"WHIP {method} {url}: HTTP {exc.code} {detail}".strip()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise VideoOutError(f"WHIP {method} {url}: {exc}") from None


class WhipPublisher:
    """An H.264 stream and its audio, live to a WHIP endpoint.

    with WhipPublisher("https://host/whip/room", fps=25) as pub:
        for f in client.stream(..., video_codec="h264", realtime=True, return_audio=True):
            pub.write(f.index, f.h264, f.keyframe, f.audio)
    """

    def __init__(
        self,
        url: str,
        fps: float,
        *,
        audio: bool = True,
        token: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise VideoOutError(f"a WHIP endpoint is an http(s):// URL, not {url!r}")
        self._rtc = _aiortc()
        self.target = url
        self.rate = Fraction(fps).limit_denominator(1001)
        self.audio = audio
        self.token = token
        self.timeout_s = timeout_s
        self.frames = 0
        self.dropped = 0
        self.resource: str | None = None  # the session's URL (Location)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="whip", daemon=True)
        self._thread.start()
        self._pc: Any = None
        self._video_q: asyncio.Queue[Any] | None = None
        self._audio_q: asyncio.Queue[Any] | None = None
        self._first_index: int | None = None
        self._closed = False

    def __enter__(self) -> WhipPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s + 5)

    # -- the session -------------------------------------------------------------------
    async def _connect(self) -> None:
        rtc = self._rtc
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

        class _Track(MediaStreamTrack):
            def __init__(self, kind: str, queue: asyncio.Queue[Any]):
                super().__init__()
                self.kind = kind
                self._queue = queue

            async def recv(self) -> Any:
                item = await self._queue.get()
                if item is None:
                    self.stop()
                    raise MediaStreamError
                return item

        self._video_q = asyncio.Queue()
        pc = rtc.RTCPeerConnection()
        self._pc = pc
        video = pc.addTransceiver(_Track("video", self._video_q), direction="sendonly")
        h264 = [
            c
            for c in rtc.RTCRtpSender.getCapabilities("video").codecs
            if c.mimeType.lower() == "video/h264" and c.parameters.get("packetization-mode") == "1"
        ]
        video.setCodecPreferences(h264)
        if self.audio:
            self._audio_q = asyncio.Queue()
            pc.addTransceiver(_Track("audio", self._audio_q), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
        offer = pc.localDescription.sdp.encode()
        status, headers, body = await self._loop.run_in_executor(
            None, _http, "POST", self.target, offer, self.token, self.timeout_s
        )
        if status != 201:
            raise VideoOutError(f"WHIP POST {self.target}: HTTP {status}, not 201 Created")
        location = headers.get("Location") or headers.get("location")
        if location:
            self.resource = urllib.parse.urljoin(self.target, location)
        answer = rtc.RTCSessionDescription(body.decode(), "answer")
        await pc.setRemoteDescription(answer)

    def write(self, index: int, au: bytes, keyframe: bool, audio: bytes = b"") -> None:
        """Frame `index` of the stream: its access unit and its audio (s16le 16 kHz).
        Frames before the first keyframe are dropped."""
        if self._closed:
            raise VideoOutError("the WHIP session is closed")
        if self._first_index is None:
            if not keyframe:
                self.dropped += 1
                return
            self._first_index = index
            try:
                self._run(self._connect())
            except VideoOutError:
                self.close()
                raise
            except Exception as exc:  # aiortc: SDP it cannot use, ...
                self.close()
                raise VideoOutError(f"WHIP {self.target}: {exc}") from exc
        import av  # aiortc's own dependency

        t = index - self._first_index
        packet = av.Packet(au)
        packet.pts = round(t / self.rate / VIDEO_CLOCK)
        packet.time_base = VIDEO_CLOCK
        items = [(self._video_q, packet)]
        if self._audio_q is not None and audio:
            pcm = np.frombuffer(audio, "<i2").reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts = round(t * AUDIO_RATE / self.rate)
            frame.time_base = Fraction(1, AUDIO_RATE)
            items.append((self._audio_q, frame))
        for queue, item in items:
            self._loop.call_soon_threadsafe(self._put, queue, item)
        self.frames += 1

    def _put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        while queue.qsize() >= MAX_QUEUED:  # the peer does not keep up: drop the oldest
            queue.get_nowait()
        queue.put_nowait(item)

    def close(self) -> None:
        """End the session (DELETE its resource) and stop the loop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for queue in (self._video_q, self._audio_q):
                if queue is not None:
                    self._put(queue, None)
            if self._pc is not None:
                # let the queued frames out (a bounded wait: a stalled peer gets closed)
                deadline = self._loop.time() + DRAIN_S
                queues = [q for q in (self._video_q, self._audio_q) if q is not None]
                while any(q.qsize() for q in queues) and self._loop.time() < deadline:
                    await asyncio.sleep(0.02)
                await self._pc.close()

        try:
            with contextlib.suppress(Exception):
                self._run(stop())
            if self.resource is not None:
                with contextlib.suppress(VideoOutError):
                    _http("DELETE", self.resource, None, self.token, self.timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
