"""The media of one WebRTC viewer: the avatar's video as pre-encoded H.264 packets (passed
through to aiortc's packetizer, never re-encoded), its sound as 20 ms audio frames that
aiortc encodes to Opus, and the one fallback encoder for a compositing service that sends
JPEG only (docs/DELIVERY.md, "WebRTC in the browser")."""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.video.reformatter import ColorRange, VideoReformatter

from lipsync.proto import compositing_pb2 as cpb

log = logging.getLogger("lipsync.web")

VIDEO_CLOCK = 90000  # RTP clock of video
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_RATE = 16000  # of StreamFrame.audio (s16le mono)
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
AUDIO_PACKET_SAMPLES = 320  # 20 ms: one Opus packet per audio frame handed to aiortc
# Frames waiting for a sender that does not keep up (before the peer connected, or a
# stalled network): a few, then the oldest are dropped.
QUEUE_FRAMES = 8
# The H.264 offered and sent: constrained baseline, level 3.1 (720p at 25 fps fits),
# non-interleaved packetization (FU-A / STAP-A).
H264_PROFILE_LEVEL_ID = "42e01f"


# Both tracks hand a frame's media to aiortc at (first arrival + this margin + its pts),
# not as soon as it is ready: aiortc's RTCP sender reports map RTP time to the wall clock
# of the last packet sent, and the browser lines audio up with video by those maps, so
# sound and picture of one pts must leave together (the margin absorbs the fallback
# encoder's time; a passed-through frame needs none of it).
PACING_MARGIN_S = 0.03
REBASE_LATE_S = 0.1  # a frame this late (the service stalled) moves the schedule


class PtsClock:
    """The send schedule both tracks of one viewer share: pts -> monotonic time."""

    def __init__(self, margin_s: float = PACING_MARGIN_S):
        self.margin_s = margin_s
        self.base: float | None = None  # monotonic time of pts 0
        self.rebases = 0

    def arrived(self, pts_ms: float) -> None:
        now = time.monotonic()
        if self.base is None:
            self.base = now + self.margin_s - pts_ms / 1000
        elif now - (self.base + pts_ms / 1000) > REBASE_LATE_S:
            self.base = now + self.margin_s - pts_ms / 1000
            self.rebases += 1

    async def wait(self, pts_ms: float) -> None:
        if self.base is None:
            return
        delay = self.base + pts_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def is_idr(annexb: bytes) -> bool:
    """Whether an Annex B access unit holds an IDR slice (NAL type 5)."""
    i = 0
    n = len(annexb)
    while True:
        i = annexb.find(b"\x00\x00\x01", i)
        if i < 0 or i + 3 >= n:
            return False
        if annexb[i + 3] & 0x1F == 5:
            return True
        i += 3


class JpegToH264:
    """H.264 from JPEG frames, for a compositing service older than this release (it
    ignores StreamStart.video_codec and sends StreamFrame.jpeg only). The same settings
    as the service's own encoder: libx264, constrained baseline, zero latency (no B
    frames, no lookahead), SPS/PPS before every keyframe. Used only when a frame comes
    without `h264`; one per viewer, called from a worker thread (encoding costs CPU)."""

    # Target bits per pixel and frame: 0.1 gives 2.3 Mbit/s at 720p and 25 fps.
    BITS_PER_PIXEL = 0.1
    MIN_BIT_RATE, MAX_BIT_RATE = 300_000, 2_500_000

    def __init__(self, fps: float = 25.0, keyint: int = 50):
        self.fps = fps
        self.keyint = keyint
        self.decoder = av.CodecContext.create("mjpeg", "r")
        self.reformatter = VideoReformatter()
        self.encoder: Any = None
        self.size: tuple[int, int] | None = None

    def _open(self, width: int, height: int) -> None:
        enc = av.CodecContext.create("libx264", "w")
        enc.width, enc.height = width, height
        enc.pix_fmt = "yuv420p"
        target = self.BITS_PER_PIXEL * width * height * self.fps
        enc.bit_rate = int(min(self.MAX_BIT_RATE, max(self.MIN_BIT_RATE, target)))
        enc.time_base = fractions.Fraction(1, 1000)
        enc.framerate = fractions.Fraction(round(self.fps * 1000), 1000)
        enc.profile = "Baseline"
        enc.options = {
            "preset": "veryfast",
            "tune": "zerolatency",
            "level": "3.1",
            "g": str(self.keyint),
            "bf": "0",
            # one thread per viewer's encoder: many viewers share the cores anyway, and
            # x264's own thread pool per encoder only adds threads and memory arenas
            "threads": "1",
        }
        self.encoder = enc
        self.size = (width, height)

    def encode(self, jpeg: bytes, pts_ms: float, keyframe: bool) -> bytes:
        """One Annex B access unit of this JPEG (a keyframe when asked, or at the start)."""
        frames = self.decoder.decode(av.Packet(jpeg))
        if not frames:
            raise ValueError("undecodable JPEG frame")
        frame = frames[-1]
        if self.size != (frame.width, frame.height):
            self._open(frame.width, frame.height)
            keyframe = True
        # JPEG's YUV is full range (yuvj420p); H.264 players assume limited (MPEG) range
        # unless told otherwise: convert, or every picture comes out ~12% too contrasty
        # (measured 27 dB against the JPEG without this, 40 dB with it).
        frame = self.reformatter.reformat(
            frame,
            format="yuv420p",
            src_color_range=ColorRange.JPEG,
            dst_color_range=ColorRange.MPEG,
        )
        frame.pts = round(pts_ms)
        frame.time_base = fractions.Fraction(1, 1000)
        frame.pict_type = (
            av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        )
        return b"".join(bytes(p) for p in self.encoder.encode(frame))


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's video for aiortc: `recv()` returns one av.Packet (an H.264 access
    unit, pts on the 90 kHz RTP clock) per StreamFrame, which aiortc's RTP sender
    packetizes as it is (`encoder.pack`). Frames carrying `h264` pass through; frames with
    only a JPEG go through JpegToH264. The queue is short; when it overflows the oldest
    frames are dropped, and passed-through H.264 then waits for a keyframe (asked of the
    service with `request_keyframe`)."""

    kind = "video"

    def __init__(
        self,
        request_keyframe: Callable[[], None],
        on_sent: Callable[[cpb.StreamFrame], None] | None = None,
        fps: float = 25.0,
        clock: PtsClock | None = None,
    ):
        super().__init__()
        self.clock = clock or PtsClock()
        self._request_keyframe = request_keyframe
        self._on_sent = on_sent
        self._queue: collections.deque[cpb.StreamFrame] = collections.deque()
        self._ready = asyncio.Event()
        self._fallback: JpegToH264 | None = None
        self._fps = fps
        self._need_keyframe = True  # a decoder can start only at one
        self._force_fallback_keyframe = True
        self.frames_sent = 0
        self.frames_dropped = 0
        self.passthrough_frames = 0
        self.fallback_frames = 0

    def put(self, frame: cpb.StreamFrame) -> None:
        if self.readyState != "live":
            return
        if len(self._queue) >= QUEUE_FRAMES:
            self._queue.popleft()
            self.frames_dropped += 1
            self._need_keyframe = True
        self._queue.append(frame)
        self._ready.set()

    def keyframe_wanted(self) -> None:
        """The viewer lost pictures (RTCP PLI / FIR) or just joined."""
        self._need_keyframe = True
        self._force_fallback_keyframe = True
        self._request_keyframe()

    def stop(self) -> None:
        super().stop()
        self._ready.set()

    async def recv(self) -> av.Packet:
        while True:
            while not self._queue:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            if self.readyState != "live":
                raise MediaStreamError
            frame = self._queue.popleft()
            data = await self._encoded(frame)
            if data is None:
                continue
            await self.clock.wait(frame.pts_ms)
            packet = av.Packet(data)
            packet.pts = round(frame.pts_ms * VIDEO_CLOCK / 1000)
            packet.time_base = VIDEO_TIME_BASE
            self.frames_sent += 1
            if self._on_sent is not None:
                self._on_sent(frame)
            return packet

    async def _encoded(self, frame: cpb.StreamFrame) -> bytes | None:
        if frame.h264:
            au = frame.h264
            if self._need_keyframe:
                if not (frame.keyframe or is_idr(au)):
                    if frame.index % 25 == 0:  # ask again now and then, not every frame
                        self._request_keyframe()
                    return None  # nothing decodable before a keyframe
                self._need_keyframe = False
            self.passthrough_frames += 1
            return au
        if not frame.jpeg:
            return None
        if self._fallback is None:
            self._fallback = JpegToH264(self._fps)
            self._request_keyframe()  # harmless for an old service; starts a new one right
        key = self._force_fallback_keyframe
        self._force_fallback_keyframe = False
        self._need_keyframe = False  # the fallback's chain never misses a frame
        try:
            au = await asyncio.get_running_loop().run_in_executor(
                None, self._fallback.encode, frame.jpeg, frame.pts_ms, key
            )
        except (ValueError, av.FFmpegError) as exc:
            log.warning("frame %d not encoded: %s", frame.index, exc)
            return None
        self.fallback_frames += 1
        return au or None


class AvatarAudioTrack(MediaStreamTrack):
    """The avatar's sound for aiortc: each StreamFrame's 40 ms of 16 kHz s16le audio as
    two 20 ms av.AudioFrames (aiortc resamples them to 48 kHz and encodes one Opus packet
    each). Frames missing from the sequence (the service skipped idle frames, or the
    queue dropped some) become silence, so the audio's RTP clock stays on the video's pts
    and the browser's lip sync (RTCP sender reports) holds."""

    kind = "audio"

    def __init__(self, clock: PtsClock | None = None) -> None:
        super().__init__()
        self.clock = clock or PtsClock()
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self._ready = asyncio.Event()
        self._pending: collections.deque[av.AudioFrame] = collections.deque()
        self._next_sample: int | None = None
        self._samples_per_frame = 640
        self.frames_dropped = 0

    def put(self, frame: cpb.StreamFrame, fps: float = 25.0) -> None:
        if self.readyState != "live":
            return
        if len(self._queue) >= QUEUE_FRAMES:
            self._queue.popleft()
            self.frames_dropped += 1
        self._samples_per_frame = round(AUDIO_RATE / fps)
        start = round(frame.pts_ms * AUDIO_RATE / 1000)
        self._queue.append((start, frame.audio))
        self._ready.set()

    def stop(self) -> None:
        super().stop()
        self._ready.set()

    def _packets(self, start: int, pcm: bytes) -> None:
        samples = np.frombuffer(pcm, "<i2")
        want = self._samples_per_frame
        if len(samples) < want:  # no return_audio, or a short frame: silence
            samples = np.concatenate([samples, np.zeros(want - len(samples), np.int16)])
        if self._next_sample is not None and start > self._next_sample:
            gap = min(start - self._next_sample, AUDIO_RATE)  # at most 1 s of silence
            samples = np.concatenate([np.zeros(gap, np.int16), samples])
            start -= gap
        elif self._next_sample is not None and start < self._next_sample:
            samples = samples[self._next_sample - start :]  # overlap: keep the clock
            start = self._next_sample
        for i in range(0, len(samples), AUDIO_PACKET_SAMPLES):
            chunk = samples[i : i + AUDIO_PACKET_SAMPLES]
            if len(chunk) < AUDIO_PACKET_SAMPLES:
                chunk = np.concatenate(
                    [chunk, np.zeros(AUDIO_PACKET_SAMPLES - len(chunk), np.int16)]
                )
            f = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            f.sample_rate = AUDIO_RATE
            f.pts = start + i
            f.time_base = AUDIO_TIME_BASE
            self._pending.append(f)
        self._next_sample = start + len(samples) + (-len(samples)) % AUDIO_PACKET_SAMPLES

    async def recv(self) -> av.AudioFrame:
        while not self._pending:
            while not self._queue:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            if self.readyState != "live":
                raise MediaStreamError
            self._packets(*self._queue.popleft())
        frame = self._pending.popleft()
        await self.clock.wait(frame.pts * 1000 / AUDIO_RATE)
        return frame
