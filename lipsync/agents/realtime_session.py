"""A realtime avatar session for voice agents, framework-neutral (docs/AGENTS.md).

    session = RealtimeAvatarSession("localhost:50052", "demo")
    await session.start()                      # in the agent's event loop
    session.push_audio(pcm, 24000)             # TTS audio: s16le bytes or an array, any rate
    session.end_of_speech()                    # the utterance is complete
    session.interrupt()                        # the user spoke: drop the queued speech
    async for item in session.frames():        # AvatarFrame (25 fps) or AvatarError
        ...
    await session.aclose()

One realtime `StreamComposite` call (`LipsyncClient.open_stream`, `realtime` and
`return_audio` on) carries the conversation: the service paces frames at the avatar's
fps, idles while no speech is queued and returns each frame's 40 ms of audio, so what the
agent plays is exactly the sound of the frame it shows. Around that call this module adds
what a conversation needs:

- Speech at any rate and channel count, downmixed and resampled to 16 kHz int16 with
  soxr's streaming resampler (HQ) before it is sent.
- Utterances (segments): `end_of_speech` pads the clip with silence so its frames carry
  all of its audio (the reference windowing makes `clip_frames(L)` frames, up to 1.5
  frames' audio short of L), and the frame that finishes a segment says so
  (`segment_end`); the audio of the padding is not returned, so the audio out is the
  audio in.
- Interruption: the service drops what it has queued; frames already on their way are
  shown as idle frames here, until the service's first idle frame after the interrupt.
- Outage: when the call fails (the service is unreachable, restarts, ends the stream) the
  session reports one `AvatarError`, goes on at the same pace with the last idle picture
  and the speech not yet shown (the voice goes on, the face idles), and reconnects with a
  backoff; it switches back to the service between utterances. The same when the service
  drops an utterance it had begun to show (its inference calls failed or were too slow
  for a realtime stream): an `AvatarError`, the rest of the speech shown here.
- Bounds: at most `queue_frames` frames wait for the consumer (the service's pacer skips
  idle frames when it is behind), at most `max_buffered_s` of speech is held.

Frames are decoded from JPEG with Pillow on the session's reader thread, off the event
loop. Threads: one reader/supervisor per session and a local pacer during an outage.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lipsync.client import LipsyncClient, LipsyncError, LiveStream, clip_frames
from lipsync.core.audio import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    from_int16,
    to_int16,
)

__all__ = [
    "AvatarError",
    "AvatarFrame",
    "RealtimeAvatarSession",
    "SpeechLedger",
    "padded_clip_length",
]

log = logging.getLogger(__name__)

FRAME_BYTES = 2 * SAMPLES_PER_FRAME  # one frame's audio, s16le: 1280 bytes


@dataclass(frozen=True, slots=True)
class AvatarFrame:
    """One video frame of the session's timeline and the audio it shows."""

    index: int  # position on this session's output timeline (0, 1, 2, ...)
    rgb: np.ndarray  # (height, width, 3) uint8
    audio: bytes  # its speech, s16le mono 16 kHz: 1280 bytes, fewer at a segment's end, b"" idle
    generated: bool  # drawn by the model from speech
    speech: bool  # its audio has sound in it (the service's flag; local frames: non-zero audio)
    held: bool = False  # made here while the service was unreachable (the last idle picture)
    segment_end: bool = False  # the last frame of an utterance (after `end_of_speech`)
    received_s: float = 0.0  # time.monotonic() when it arrived (before decoding) or was made
    epoch: int = field(default=0, repr=False)  # interrupts before it (internal)


@dataclass(frozen=True, slots=True)
class AvatarError:
    """The service failed mid-conversation; frames go on (idle) and it reconnects."""

    message: str
    code: Any = None  # the gRPC status code, when there was one


def padded_clip_length(n: int) -> int:
    """The shortest length >= n (16 kHz samples) whose clip frames carry all n samples:
    `clip_frames(p) * 640 >= n` (a clip of n samples alone gets up to 1.5 frames fewer)."""
    p = max(n, MIN_SAMPLES)
    while clip_frames(p) * SAMPLES_PER_FRAME < n:
        p += 200  # one mel hop: the frame count changes only at these steps
    return p


@dataclass
class _Segment:
    audio: bytearray = field(default_factory=bytearray)  # s16le 16 kHz
    ended: bool = False
    padded: int = 0  # samples, once ended (what was sent, padding included)
    frames: int = 0  # the frames the service makes of it, once ended

    @property
    def samples(self) -> int:
        return len(self.audio) // 2


class SpeechLedger:
    """The speech pushed and not yet shown, by utterance, as 16 kHz s16le.

    The head segment is the one being shown; `take` moves along it one frame at a time:
    `remote=True` for a frame the service made (640 samples of the clip it was sent; the
    utterance ends with the clip's last frame), `remote=False` for a frame made here (at
    most what has arrived; it ends with its last sample).
    Not thread-safe: the session holds its lock.
    """

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self._segs: deque[_Segment] = deque()
        self._pos = 0  # samples of the head segment shown
        self._shown = 0  # frames of the head segment shown
        self._held = 0  # samples held in all segments

    def add(self, pcm: bytes) -> None:
        """Append speech to the open utterance (a new one after an ended one)."""
        if self._held + len(pcm) // 2 > self.max_samples:
            raise OverflowError(
                f"more than {self.max_samples / SAMPLE_RATE:.0f} s of speech waits to be shown"
            )
        if not self._segs or self._segs[-1].ended:
            self._segs.append(_Segment())
        self._segs[-1].audio += pcm
        self._held += len(pcm) // 2

    def end(self) -> int:
        """End the open utterance; returns the silence (samples) to send after it so its
        frames carry all of it (0 when no utterance is open)."""
        if not self._segs or self._segs[-1].ended:
            return 0
        seg = self._segs[-1]
        seg.ended = True
        seg.padded = padded_clip_length(seg.samples)
        seg.frames = clip_frames(seg.padded)
        return seg.padded - seg.samples

    def take(self, remote: bool) -> tuple[bytes, bool]:
        """One frame along the head utterance: (its audio, whether the utterance ended)."""
        if not self._segs:
            return b"", False
        seg = self._segs[0]
        step = SAMPLES_PER_FRAME if remote else min(SAMPLES_PER_FRAME, seg.samples - self._pos)
        audio = bytes(seg.audio[2 * self._pos : 2 * (self._pos + step)])
        self._pos += step
        self._shown += 1
        done = seg.ended and (self._shown >= seg.frames if remote else self._pos >= seg.samples)
        if done:
            self._pop()
        return audio, done

    def idle_seen(self) -> tuple[bool, int]:
        """The service sent an idle frame. Returns (ended, dropped): `ended` when an ended
        utterance it had begun is over (a pause may have cut its clip a frame or two
        short); `dropped`, the samples of a begun utterance it never showed, when more are
        missing than a cut explains: the service dropped the speech (its inference failed
        or was too slow), and the ledger keeps them to be shown here."""
        if not self._segs or self._pos == 0:
            return False, 0
        seg = self._segs[0]
        missing = seg.samples - self._pos
        if missing > 2 * SAMPLES_PER_FRAME:
            return False, missing
        if seg.ended:
            self._pop()
            return True, 0
        return False, 0

    def clear(self) -> None:
        self._segs.clear()
        self._pos = self._shown = self._held = 0

    def _pop(self) -> None:
        self._held -= self._segs.popleft().samples
        self._pos = self._shown = 0

    @property
    def empty(self) -> bool:
        return not self._segs

    @property
    def open(self) -> bool:
        return bool(self._segs) and not self._segs[-1].ended


class _Resampler:
    """Mono float32 speech at any rate to 16 kHz int16: soxr's streaming resampler (HQ) in
    float32, then the one int16 rule `to_int16`; one rate at a time."""

    def __init__(self) -> None:
        self._rate = SAMPLE_RATE
        self._stream: Any = None

    def __call__(self, x: np.ndarray, rate: int) -> np.ndarray:
        if rate != self._rate:
            tail = self.flush()
            self._rate = rate
            if tail.size:
                return np.concatenate([tail, self(x, rate)])
        if rate == SAMPLE_RATE:
            return to_int16(x)
        if self._stream is None:
            import soxr

            self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return to_int16(self._stream.resample_chunk(x))

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, np.int16)
        out = to_int16(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        self._stream = None
        return out

    def reset(self) -> None:
        self._stream = None


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    """A JPEG as an (H, W, 3) uint8 RGB array (Pillow)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class RealtimeAvatarSession:
    """A conversation's avatar stream: speech in, paced RGB frames with their audio out.

    Construct anywhere, `await start()` in the event loop that will consume `frames()`.
    `push_audio`, `end_of_speech` and `interrupt` are cheap and non-blocking; call them
    from that loop. See the module docstring for what happens around the service call.
    """

    # Messages waiting for the service to read them: TTS sends speech faster than real
    # time in small chunks, and the service reads a clip only so far ahead; the speech
    # itself is bounded by `max_buffered_s`.
    MAX_PENDING_MESSAGES = 8192

    def __init__(
        self,
        address: str,
        model_id: str,
        *,
        client: LipsyncClient | None = None,
        start_frame_idx: int = 0,
        queue_frames: int = 8,
        max_buffered_s: float = 120.0,
        reconnect_min_s: float = 0.25,
        reconnect_max_s: float = 2.0,
        connect_timeout_s: float = 10.0,
        **client_options: Any,
    ):
        """`client_options` go to `LipsyncClient` (ca_file, api_key, ...); `client` is an
        open client to use instead (the session does not close it)."""
        if queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")
        self.address = address
        self.model_id = model_id
        self._own_client = client is None
        self._client = client or LipsyncClient(
            address, timeout_s=connect_timeout_s, **client_options
        )
        self._start_frame_idx = start_frame_idx
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._connect_timeout_s = connect_timeout_s
        self.fps = 25
        self.width = 0
        self.height = 0

        self._lock = threading.Lock()
        self._ledger = SpeechLedger(int(max_buffered_s * SAMPLE_RATE))
        self._resample = _Resampler()
        self._live: LiveStream | None = None
        self._remote = False  # frames come from the service (else made here)
        self._dropping = False  # after an interrupt, until the service's next idle frame
        self._epoch = 0
        self._out_index = 0
        self._held_rgb: np.ndarray | None = None
        self._closed = threading.Event()
        self._local_gen = 0  # bumped to stop the local pacer
        self._pacer: threading.Thread | None = None
        self._pacer_gen = 0
        self._threads: list[threading.Thread] = []

        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[AvatarFrame | AvatarError | None] = asyncio.Queue()
        self._slots = threading.Semaphore(queue_frames)
        self.frames_from_service = 0
        self.frames_held = 0
        self.errors = 0

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Look the avatar up (its size and fps) and open the stream. Raises `LipsyncError`
        when the service cannot be reached or does not know the avatar."""
        self._loop = asyncio.get_running_loop()
        try:
            models = await asyncio.to_thread(self._client.list_models)
        except LipsyncError:
            await self.aclose()
            raise
        info = next((m for m in models if m.model_id == self.model_id), None)
        if info is None:
            await self.aclose()
            known = ", ".join(sorted(m.model_id for m in models)) or "none"
            raise LipsyncError(f"unknown avatar {self.model_id!r} (known: {known})")
        self.fps = info.fps or 25
        # The size is known once the service holds the avatar's frames; else from the
        # first frame (start() waits for it).
        self.width, self.height = info.frame_width, info.frame_height
        first = threading.Event()
        failed: list[LipsyncError] = []
        t = threading.Thread(
            target=self._supervise, args=(first, failed), name="avatar-stream", daemon=True
        )
        self._threads.append(t)
        t.start()
        if not await asyncio.to_thread(first.wait, self._connect_timeout_s):
            await self.aclose()
            raise LipsyncError(
                f"no frame from {self.address} within {self._connect_timeout_s:.0f} s"
            )
        if failed:
            await self.aclose()
            raise failed[0]

    async def aclose(self) -> None:
        """End the stream and the threads (bounded waits); `frames()` ends."""
        self._closed.set()
        with self._lock:
            live = self._live
        if live is not None:
            live.cancel()
        for t in self._threads:
            await asyncio.to_thread(t.join, 5.0)
        if self._own_client:
            self._client.close()
        self._queue.put_nowait(None)

    @property
    def connected(self) -> bool:
        """Whether frames come from the service now (False during an outage)."""
        return self._remote

    # -- input ---------------------------------------------------------------------------
    def push_audio(self, pcm: bytes | np.ndarray, sample_rate: int, num_channels: int = 1) -> None:
        """Speech for the current utterance: s16le bytes or an int16/float array,
        interleaved when `num_channels` > 1, at any rate."""
        x = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes | bytearray) else pcm
        x = np.asarray(x).reshape(-1)
        x = from_int16(x) if x.dtype == np.int16 else x.astype(np.float32, copy=False)
        if num_channels > 1:  # the mean of the channels, in float (rounded once, at the end)
            x = x[: x.size - x.size % num_channels].reshape(-1, num_channels).mean(axis=1)
        with self._lock:
            y = self._resample(x, int(sample_rate))
            self._add(y)

    def end_of_speech(self) -> None:
        """The utterance is complete: its last frames are made now."""
        with self._lock:
            self._add(self._resample.flush())
            was_open = self._ledger.open
            pad = self._ledger.end()
            if was_open and self._remote and self._live is not None:
                self._send(lambda s: self._end_clip(s, pad))

    @staticmethod
    def _end_clip(stream: LiveStream, pad: int) -> None:
        if pad:
            stream.send_audio(np.zeros(pad, np.int16))
        stream.end_of_audio()

    def interrupt(self) -> None:
        """Drop the speech not shown yet; the next frames are idle ones."""
        with self._lock:
            self._epoch += 1
            self._ledger.clear()
            self._resample.reset()
            if self._remote and self._live is not None:
                self._dropping = True
                self._send(lambda s: s.interrupt())

    @property
    def pending_speech(self) -> bool:
        """Whether speech pushed has not all been shown yet."""
        with self._lock:
            return not self._ledger.empty

    async def wait_spoken(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until all speech pushed has been shown."""
        end = time.monotonic() + timeout_s
        while self.pending_speech and time.monotonic() < end and not self._closed.is_set():
            await asyncio.sleep(1.0 / self.fps)
        return not self.pending_speech

    def _add(self, y: np.ndarray) -> None:
        if y.size == 0:
            return
        pcm = y.astype("<i2", copy=False).tobytes()
        try:
            self._ledger.add(pcm)
        except OverflowError as exc:
            log.warning("avatar %s: speech dropped: %s", self.model_id, exc)
            return
        if self._remote and self._live is not None:
            self._send(lambda s: s.send_audio(y))

    def _send(self, fn: Any) -> None:
        """Call `fn(live_stream)`; a full or closed stream is an outage (the reader sees
        the call fail and switches over)."""
        try:
            fn(self._live)
        except LipsyncError as exc:
            log.warning("avatar %s: cannot send to the service: %s", self.model_id, exc)
            if self._live is not None:
                self._live.cancel()

    # -- output --------------------------------------------------------------------------
    async def frames(self) -> AsyncIterator[AvatarFrame | AvatarError]:
        """Frames at the avatar's fps (and an `AvatarError` when the service fails), until
        `aclose()`. Speech frames made before an interrupt arrive as idle frames (the last
        idle picture, no audio)."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, AvatarFrame):
                self._slots.release()
                if (item.generated or item.audio) and item.epoch != self._epoch:
                    item = self._as_idle(item)  # speech from before an interrupt
            yield item

    def _as_idle(self, f: AvatarFrame) -> AvatarFrame:
        rgb = self._held_rgb if self._held_rgb is not None else f.rgb
        return replace(f, rgb=rgb, audio=b"", generated=False, speech=False, segment_end=False)

    def _emit(self, item: AvatarFrame | AvatarError) -> bool:
        """Hand an item to the event loop; waits for a free slot (bounded queue)."""
        if isinstance(item, AvatarFrame):
            while not self._slots.acquire(timeout=0.1):
                if self._closed.is_set():
                    return False
        if self._closed.is_set() or self._loop is None:
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _frame(
        self, rgb: np.ndarray, audio: bytes, received_s: float | None = None, **flags: Any
    ) -> AvatarFrame:
        f = AvatarFrame(
            index=self._out_index,
            rgb=rgb,
            audio=audio,
            received_s=time.monotonic() if received_s is None else received_s,
            epoch=self._epoch,
            **flags,
        )
        self._out_index += 1
        return f

    # -- the service call ----------------------------------------------------------------
    def _supervise(self, first: threading.Event, failed: list[LipsyncError]) -> None:
        """Open the stream, read it; on failure report, idle here and reconnect."""
        delay = self._reconnect[0]
        reported = False
        while not self._closed.is_set():
            got_frame = False
            error: LipsyncError | None = None
            try:
                live = self._client.open_stream(
                    self.model_id,
                    start_frame_idx=self._start_frame_idx + self._out_index,
                    realtime=True,
                    return_audio=True,
                    max_pending=self.MAX_PENDING_MESSAGES,
                )
                with self._lock:
                    self._live = live
                for msg in live:
                    more = self._on_service_frame(msg)
                    if not got_frame:
                        got_frame = True
                        first.set()  # after the first frame set the size
                        if reported:
                            log.info("avatar %s: the service is back", self.model_id)
                        reported, delay = False, self._reconnect[0]
                    if not more:
                        break
                else:
                    error = LipsyncError("the service ended the stream")
            except LipsyncError as exc:
                error = exc
            except Exception as exc:  # a frame that does not decode, ...: an outage too
                error = LipsyncError(f"{type(exc).__name__}: {exc}")
            with self._lock:
                if self._live is not None:
                    self._live.cancel()
                self._live = None
                self._remote = False
                self._dropping = False
            if self._closed.is_set():
                break
            if not first.is_set():  # start() reports it
                failed.append(error or LipsyncError("the stream ended"))
                first.set()
                return
            self._start_local()
            if not reported and error is not None:
                reported = True
                self.errors += 1
                log.warning("avatar %s: stream failed, idling: %s", self.model_id, error)
                self._emit(AvatarError(str(error), error.code))
            self._closed.wait(delay)
            delay = min(delay * 2, self._reconnect[1])

    def _on_service_frame(self, msg: Any) -> bool:
        """One StreamFrame from the service; False once the session is closed."""
        arrived = time.monotonic()
        rgb = decode_jpeg_rgb(msg.jpeg)
        with self._lock:
            if self._held_rgb is None:
                self._held_rgb = rgb
                self.height, self.width = rgb.shape[:2]
            if not self._remote:
                if not self._ledger.empty:
                    return True  # the speech held here is shown here; switch between utterances
                self._remote = True
                self._local_gen += 1  # the local pacer stops
            dropped = 0
            if not msg.generated:
                self._held_rgb = rgb
                self._dropping = False
                ended, dropped = self._ledger.idle_seen()
                if dropped:  # show the rest here; the service drops what it still holds
                    self._remote = False
                    self._send(lambda s: s.interrupt())
                frame = self._frame(
                    rgb, b"", arrived, generated=False, speech=False, segment_end=ended
                )
            elif self._dropping:
                held = self._held_rgb if self._held_rgb is not None else rgb
                frame = self._frame(held, b"", arrived, generated=False, speech=False)
            else:
                real, ended = self._ledger.take(remote=True)
                audio = msg.audio[: len(real)] if real else b""
                frame = self._frame(
                    rgb, audio, arrived, generated=True, speech=bool(msg.speech), segment_end=ended
                )
            self.frames_from_service += 1
        more = self._emit(frame)
        if dropped:
            self.errors += 1
            message = (
                f"the service dropped {dropped / SAMPLE_RATE:.2f} s of speech (its inference "
                "failed or was too slow); it is played with the idle picture"
            )
            log.warning("avatar %s: %s", self.model_id, message)
            self._emit(AvatarError(message))
            self._start_local()
        return more

    # -- during an outage ----------------------------------------------------------------
    def _start_local(self) -> None:
        """Start the local pacer unless one runs (the supervisor thread only)."""
        with self._lock:
            if self._remote or (
                self._pacer is not None
                and self._pacer.is_alive()
                and self._pacer_gen == self._local_gen
            ):
                return
            self._local_gen += 1
            self._pacer_gen = self._local_gen
        self._pacer = threading.Thread(
            target=self._local_pacer, args=(self._pacer_gen,), name="avatar-held", daemon=True
        )
        self._threads.append(self._pacer)
        self._pacer.start()

    def _local_pacer(self, gen: int) -> None:
        """While the service is away: the last idle picture at the avatar's fps, with the
        speech not yet shown (the voice goes on)."""
        period = 1.0 / self.fps
        due = time.monotonic()
        while not self._closed.is_set():
            with self._lock:
                if self._remote or gen != self._local_gen:
                    return
                audio, ended = self._ledger.take(remote=False)
                rgb = self._held_rgb
                assert rgb is not None  # set by the first frame, before any outage
                frame = self._frame(
                    rgb,
                    audio,
                    generated=False,
                    speech=bool(np.any(np.frombuffer(audio, "<i2"))),
                    held=True,
                    segment_end=ended,
                )
                self.frames_held += 1
            if not self._emit(frame):
                return
            due += period
            now = time.monotonic()
            if now - due > 2 * period:  # a slow consumer: catch up, do not burst
                due = now
            self._closed.wait(max(0.0, due - now))
