"""Audio ingest: a stream's PCM chunks into clips of 16 kHz samples.

A clip grows with each chunk (resampled chunk by chunk with soxr's streaming resampler
when the stream's rate is not 16 kHz) and ends with `end_of_audio`, the client closing
its side, or a gap flush by the planner. It keeps only the tail of its samples that its
unplanned frames still need (`Clip.take` forgets the rest) and when each part arrived,
for the frames' `latency_ms`.

The ingest stage runs in the session's reader thread. It hands its clips to a
`ClipSink` (the planner) as they start, grow and end; each `Clip` has its own lock, since
the planner reads it (and may end it) while the reader appends to it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import soxr

from lipsync.core.audio import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioError,
    pad_to_min_clip,
    pcm_samples,
)
from lipsync.core.lookahead import ready_frames, samples_needed, tail_offset
from lipsync.core.windows import frames_of_samples


class StreamError(ValueError):
    """The client sent something the stream cannot use; the message says what."""


# A frame's `speech` flag looks at +-100 ms of audio around it; a clip keeps that much
# behind its next frame (tail_offset keeps more anyway).
SPEECH_SPAN = 1600


class SampleBuffer:
    """A growing float32 buffer that forgets its head: holds samples [base, length)."""

    def __init__(self) -> None:
        self._buf = np.empty(16000, np.float32)
        self._start = 0  # index in _buf of sample `base`
        self._end = 0
        self.base = 0

    @property
    def length(self) -> int:
        return self.base + self._end - self._start

    @property
    def held(self) -> int:
        return self._end - self._start

    def append(self, x: np.ndarray) -> None:
        if self._end + len(x) > len(self._buf):
            live = self._buf[self._start : self._end]
            cap = max(len(self._buf), 2 * (len(live) + len(x)))
            new = np.empty(cap, np.float32)
            new[: len(live)] = live
            self._buf, self._start, self._end = new, 0, len(live)
        self._buf[self._end : self._end + len(x)] = x
        self._end += len(x)

    def get(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) (global indices, clipped to what is held), zero-padded
        where they fall before the buffer's start."""
        stop = min(stop, self.length)
        out = np.zeros(max(0, stop - start), np.float32)
        lo = max(start, self.base)
        if stop > lo:
            out[lo - start :] = self._buf[
                self._start + lo - self.base : self._start + stop - self.base
            ]
        return out

    def forget_before(self, sample: int) -> None:
        drop = min(sample, self.length) - self.base
        if drop > 0:
            self._start += drop
            self.base += drop


@dataclass(frozen=True)
class AudioTail:
    """Samples [offset, offset + len(samples)) of a clip: what one batch's frames need
    (the inference service's input and the frames' own audio)."""

    offset: int
    samples: np.ndarray  # float32, 16 kHz

    @property
    def end(self) -> int:
        return self.offset + len(self.samples)

    def get(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop), clipped at the tail's end, zeros before its start (that
        is, before the clip's start: a tail starts where its frames' audio does)."""
        stop = min(stop, self.end)
        out = np.zeros(max(0, stop - start), np.float32)
        lo = max(start, self.offset)
        if stop > lo:
            out[lo - start :] = self.samples[lo - self.offset : stop - self.offset]
        return out


class Clip:
    """One clip's 16 kHz audio as it arrives. Written by the ingest stage (`add`, `end`)
    and by the planner's gap flush (`end`); read by the planner (`ready`, `take`).
    Thread-safe: every method holds the clip's own lock."""

    def __init__(self, clip_id: int, rate: int, clock: Callable[[], float] = time.monotonic):
        self.id = clip_id
        self._clock = clock
        self._lock = threading.Lock()
        self._samples = SampleBuffer()
        self._resampler = (
            soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            if rate != SAMPLE_RATE
            else None
        )
        self._ended = False
        self._total = 0  # frames of the clip, once ended
        self._last_audio = clock()
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples so far, time)

    # -- written by ingest (and the planner's gap flush) ---------------------------------
    def add(self, x: np.ndarray) -> bool:
        """Append samples at the stream's rate; False (nothing added) once ended."""
        with self._lock:
            if self._ended:
                return False
            if self._resampler is not None:
                x = self._resampler.resample_chunk(x)
            self._add(x)
            return True

    def end(self) -> bool:
        """End the clip (flush the resampler, pad a clip shorter than the reference
        windows accept); True if this call ended it."""
        with self._lock:
            if self._ended:
                return False
            if self._resampler is not None:
                self._add(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            n = self._samples.length
            if 0 < n < MIN_SAMPLES:  # nothing was forgotten: ready_frames(n) == 0
                padded, _ = pad_to_min_clip(self._samples.get(0, n))
                self._add(padded[n:])
            self._ended = True
            self._total = frames_of_samples(self._samples.length) if n else 0
            return True

    def _add(self, x: np.ndarray) -> None:
        self._samples.append(np.asarray(x, np.float32))
        now = self._clock()
        self._last_audio = now
        self._arrivals.append((self._samples.length, now))

    # -- read by the planner -------------------------------------------------------------
    @property
    def ended(self) -> bool:
        with self._lock:
            return self._ended

    @property
    def total(self) -> int:
        """Frames of the clip, once ended (0 before)."""
        with self._lock:
            return self._total

    @property
    def length(self) -> int:
        """16 kHz samples so far."""
        with self._lock:
            return self._samples.length

    @property
    def held(self) -> int:
        """Samples still in memory."""
        with self._lock:
            return self._samples.held

    @property
    def last_audio(self) -> float:
        with self._lock:
            return self._last_audio

    def ready(self) -> int:
        """Frames that can be computed now (all of them once the clip ended)."""
        with self._lock:
            return self._total if self._ended else ready_frames(self._samples.length)

    def take(self, first: int, stop: int) -> tuple[AudioTail, list[float]]:
        """The audio frames `first .. stop - 1` need (from `tail_offset(first)` to what
        has arrived) and when the last of each frame's audio arrived; then forgets what
        frames from `stop` on no longer need."""
        with self._lock:
            # only up to the last frame's lookahead: more audio cannot change these frames
            # (lookahead.samples_needed), so a long backlog behind them is not sent
            offset = tail_offset(first)
            end = min(self._samples.length, samples_needed(stop - 1))
            tail = AudioTail(offset, self._samples.get(offset, max(offset, end)))
            arrivals = [
                self._last_audio if self._ended else self._arrival_of(i) for i in range(first, stop)
            ]
            self._forget_before(stop)
            return tail, arrivals

    def _arrival_of(self, frame: int) -> float:
        need = samples_needed(frame)
        for n, t in self._arrivals:
            if n >= need:
                return t
        return self._arrivals[-1][1] if self._arrivals else self._clock()

    def _forget_before(self, frame: int) -> None:
        keep = min(tail_offset(frame), max(0, frame * SAMPLES_PER_FRAME - SPEECH_SPAN))
        self._samples.forget_before(keep)
        need = samples_needed(frame)
        while len(self._arrivals) > 1 and self._arrivals[1][0] < need:
            self._arrivals.popleft()


class ClipSink(Protocol):
    """Where the ingest stage hands its clips (the planner)."""

    def clip_started(self, clip: Clip) -> None: ...

    def clip_grew(self, clip: Clip) -> None: ...

    def clip_ended(self, clip: Clip) -> None: ...

    def input_closed(self) -> None: ...


class AudioIngest:
    """Decodes a stream's chunks and cuts them into clips (one thread: the reader)."""

    def __init__(
        self,
        rate: int,
        encoding: str,
        sink: ClipSink,
        clock: Callable[[], float] = time.monotonic,
        max_buffered_s: float = 0.0,
    ):
        self.rate = rate
        self.encoding = encoding  # "f32le" or "s16le"
        self.sink = sink
        self._clock = clock
        self._current: Clip | None = None  # the clip audio goes to
        self._next_id = 0
        # Backpressure: while the open clip holds more than this many 16 kHz samples not
        # yet made into frames, `audio` waits (the reader stops reading, so gRPC flow
        # control holds a sender that runs ahead); 0: no bound. One chunk may not be
        # longer than that either.
        self.max_buffered = int(max_buffered_s * SAMPLE_RATE)
        self.max_chunk_bytes = int(max_buffered_s * rate) * 4 if max_buffered_s > 0 else 0
        self._stopped = threading.Event()

    def decode(self, data: bytes) -> np.ndarray:
        """A chunk as float32 samples at the stream's rate; StreamError if unusable."""
        try:
            return pcm_samples(data, self.encoding)
        except AudioError as exc:
            raise StreamError(f"audio chunk: {exc}") from exc

    def audio(self, data: bytes) -> None:
        if self.max_chunk_bytes and len(data) > self.max_chunk_bytes:
            raise StreamError(
                f"audio chunk of {len(data)} bytes: at most {self.max_chunk_bytes} per message"
            )
        x = self.decode(data)
        if not len(x):
            return
        clip = self._current
        if clip is None or not clip.add(x):  # none yet, or ended (end_of_audio, gap flush)
            clip = self._current = Clip(self._next_id, self.rate, self._clock)
            self._next_id += 1
            clip.add(x)
            self.sink.clip_started(clip)
        self.sink.clip_grew(clip)
        self._wait_for_room(clip)

    def _wait_for_room(self, clip: Clip) -> None:
        """Backpressure (see `max_buffered`): wait while `clip` holds too much unplanned
        audio, until the planner takes it, the clip is dropped (interrupt) or the
        session stops."""
        while (
            self.max_buffered
            and clip is self._current
            and clip.held > self.max_buffered
            and not self._stopped.wait(0.005)
        ):
            pass

    def stop(self) -> None:
        """The session ends: stop waiting for room."""
        self._stopped.set()

    def end_of_audio(self) -> None:
        clip, self._current = self._current, None
        if clip is not None and clip.end():
            self.sink.clip_ended(clip)

    def interrupt(self, epoch: int) -> None:
        """Queued speech is dropped: the next audio starts a new clip."""
        self._current = None

    def close(self) -> None:
        """No more input: end the open clip."""
        self.end_of_audio()
        self.sink.input_closed()
