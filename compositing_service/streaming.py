"""Streaming sessions (StreamComposite): audio chunks in, JPEG frames out as soon as the
audio they need has arrived.

A session's audio is a sequence of clips: a clip grows with each audio chunk and ends
with `end_of_audio` (or, in realtime mode, when the player is waiting for it and no
audio has come for `gap_flush_ms`). Frame i of a growing clip is final once
`audio.samples_needed(i)` samples have arrived (about 452.5 ms ahead of the frame); it
is then computed exactly as the offline clip would compute it. The inference service
gets only the clip tail those frames need (`sample_offset`), so a session's cost per
frame does not grow with its length, and the session keeps only that tail in memory.

Three threads per session:
- the reader (the gRPC request iterator) appends audio and handles control messages;
- the producer plans batches of ready frames, calls the inference service, and hands
  the mouths to the compositor;
- the compositor pastes and JPEG-encodes, in order, into the output queue;
and the RPC's response generator (the player) emits frames: in realtime mode paced by
presentation time at the avatar's fps, with idle frames whenever no speech is due, so
the video never stalls; otherwise as fast as they are made.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import soxr

from compositing_service.background_cache import AvatarFrames, pingpong
from compositing_service.compositor import Compositor
from compositing_service.inference_client import InferenceClient
from inference_service import audio
from lipsync.config import StreamConfig
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = audio.SAMPLE_RATE // audio.VIDEO_FPS  # 640
SPEECH_RMS = 10 ** (-50 / 20)  # -50 dBFS
SPEECH_SPAN = 1600  # +-100 ms of audio around a frame decide its `speech` flag


class StreamError(ValueError):
    """The client sent something the stream cannot use; the message says what."""


class _Samples:
    """A growing float32 buffer that forgets its head: holds samples [base, length)."""

    def __init__(self) -> None:
        self._buf = np.empty(16000, np.float32)
        self._start = 0  # index in _buf of sample `base`
        self._end = 0
        self.base = 0

    @property
    def length(self) -> int:
        return self.base + self._end - self._start

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


@dataclass
class Clip:
    id: int
    samples: _Samples = field(default_factory=_Samples)
    resampler: soxr.ResampleStream | None = None
    ended: bool = False
    total: int = 0  # frames of the clip, once ended
    next_frame: int = 0  # next frame to plan
    slot0: int | None = None  # timeline slot of frame 0 (set when first planned)
    last_audio: float = field(default_factory=time.monotonic)
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)  # (samples so far, time)

    def ready(self) -> int:
        """Frames that can be computed now."""
        return self.total if self.ended else audio.ready_frames(self.samples.length)

    def end(self) -> None:
        if self.ended:
            return
        if self.resampler is not None:
            self._add(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        n = self.samples.length
        if 0 < n < audio.MIN_SAMPLES:  # too short for the reference windows: pad with silence
            self._add(np.zeros(audio.MIN_SAMPLES - n, np.float32))
        self.ended = True
        self.total = audio.clip_frame_count(1 + self.samples.length // audio.HOP) if n else 0

    def add(self, x: np.ndarray) -> None:
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x)
        self._add(x)

    def _add(self, x: np.ndarray) -> None:
        self.samples.append(np.asarray(x, np.float32))
        now = time.monotonic()
        self.last_audio = now
        self.arrivals.append((self.samples.length, now))

    def arrival_of(self, frame: int) -> float:
        """When the last audio frame `frame` needed arrived."""
        need = audio.samples_needed(frame)
        for n, t in self.arrivals:
            if n >= need:
                return t
        return self.arrivals[-1][1] if self.arrivals else time.monotonic()

    def forget_before(self, frame: int) -> None:
        """Drop audio that frames >= `frame` no longer need (keeps +-100 ms for flags)."""
        keep = min(audio.tail_offset(frame), max(0, frame * SAMPLES_PER_FRAME - SPEECH_SPAN))
        self.samples.forget_before(keep)
        need = audio.samples_needed(frame)
        while len(self.arrivals) > 1 and self.arrivals[1][0] < need:
            self.arrivals.popleft()


@dataclass
class OutFrame:
    slot: int
    jpeg: bytes
    speech: bool
    clip: int
    clip_frame: int
    background: int
    audio: bytes
    arrival: float


@dataclass
class _Planned:
    clip: Clip
    generation: int
    first: int
    slots: list[int]
    backgrounds: list[int]
    crops: list[np.ndarray]
    mouths: np.ndarray
    flags: list[bool]
    audio: list[bytes]
    arrivals: list[float]
    started: float = 0.0


def decode_chunk(data: bytes, encoding: int) -> np.ndarray:
    """A stream's audio chunk as float32 samples at the stream's rate."""
    try:
        return audio.pcm_samples(data, "s16le" if encoding == cpb.PCM_S16LE else "f32le")
    except audio.AudioError as exc:
        raise StreamError(f"audio chunk: {exc}") from exc


class StreamSession:
    def __init__(
        self,
        start: cpb.StreamStart,
        avatar: AvatarFrames,
        inference: InferenceClient,
        compositor: Compositor,
        settings: StreamConfig,
        idle_jpeg,  # Callable[[int], bytes]: JPEG of background frame i, unmodified
    ):
        try:
            rate = audio.check_rate(start.sample_rate)
        except audio.AudioError as exc:
            raise StreamError(str(exc)) from exc
        if start.audio_encoding not in (cpb.PCM_F32LE, cpb.PCM_S16LE):
            raise StreamError(f"unknown audio_encoding {start.audio_encoding}")
        self.start = start
        self.rate = rate
        self.avatar = avatar
        self.inference = inference
        self.compositor = compositor
        self.settings = settings
        self.idle_jpeg = idle_jpeg
        self.realtime = start.realtime
        self.frame_s = 1.0 / avatar.fps
        self.cond = threading.Condition()
        self.clips: deque[Clip] = deque()  # clips with frames still to plan
        self.next_clip_id = 0
        self.out: deque[OutFrame] = deque()
        self.generation = 0  # bumped by interrupt: planned work of older ones is dropped
        self.input_closed = False
        self.error: BaseException | None = None
        self.cancelled = False
        self.player_slot = 0  # slot the player emits next
        self.player_waiting = False  # realtime: the player waits for a speech frame
        self.speech_until = 0  # slots before this are committed to scheduled speech
        self.batch_ms = 40.0  # moving average of a batch's production time (plan to JPEG)
        self.clock0 = time.monotonic()  # realtime: when slot 0 is due
        self.production_done = False
        self._handoff: queue.Queue[_Planned | None] = queue.Queue(maxsize=2)

    # -- input (reader thread) -----------------------------------------------------------
    def feed(self, requests: Iterator[cpb.StreamRequest]) -> None:
        try:
            for req in requests:
                kind = req.WhichOneof("msg")
                if kind == "audio":
                    self._audio(decode_chunk(req.audio, self.start.audio_encoding))
                elif kind == "end_of_audio":
                    with self.cond:
                        if self.clips and not self.clips[-1].ended:
                            self._end_clip(self.clips[-1])
                        self.cond.notify_all()
                elif kind == "interrupt":
                    self.interrupt()
                elif kind == "start":
                    raise StreamError("start may only be the first message")
                if self.cancelled:
                    return
        except StreamError as exc:
            self.fail(exc)
        except Exception as exc:  # the client went away mid-read, ...
            if not self.cancelled:
                self.fail(exc)
        finally:
            with self.cond:
                self.input_closed = True
                for clip in self.clips:
                    self._end_clip(clip)
                self.cond.notify_all()

    def _audio(self, x: np.ndarray) -> None:
        if not len(x):
            return
        with self.cond:
            if not self.clips or self.clips[-1].ended:
                clip = Clip(self.next_clip_id)
                self.next_clip_id += 1
                if self.rate != audio.SAMPLE_RATE:
                    clip.resampler = soxr.ResampleStream(
                        self.rate, audio.SAMPLE_RATE, 1, dtype="float32", quality="HQ"
                    )
                self.clips.append(clip)
            self.clips[-1].add(x)
            self.cond.notify_all()

    def _end_clip(self, clip: Clip) -> None:
        """Caller holds the lock."""
        clip.end()
        if clip.slot0 is not None:
            self.speech_until = max(self.speech_until, clip.slot0 + clip.total)
        if clip.total == 0 and clip in self.clips:
            self.clips.remove(clip)

    def interrupt(self) -> None:
        with self.cond:
            self.generation += 1
            self.clips.clear()
            self.out.clear()
            self.speech_until = self.player_slot
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    # -- production (producer and compositor threads) -----------------------------------
    def _plan(self) -> tuple[Clip, int, int, int, list[int]] | None:
        """Wait for ready frames; returns (clip, generation, first, stop, slots)."""
        with self.cond:
            while True:
                if self.cancelled or self.error is not None:
                    return None
                while (
                    self.clips
                    and self.clips[0].ended
                    and self.clips[0].next_frame >= self.clips[0].total
                ):
                    self.clips.popleft()
                if self.clips:
                    clip = self.clips[0]
                    self._maybe_flush(clip)
                    ready = clip.ready()
                    if ready > clip.next_frame and self._room():
                        break
                elif self.input_closed:
                    return None
                self.cond.wait(0.02 if self.realtime else 0.5)
            first = clip.next_frame
            stop = min(ready, first + self.settings.max_batch)
            if clip.slot0 is None:
                clip.slot0 = self._schedule(clip)
            slots = [clip.slot0 + i for i in range(first, stop)]
            clip.next_frame = stop
            if clip.ended:
                self.speech_until = max(self.speech_until, clip.slot0 + clip.total)
            return clip, self.generation, first, stop, slots

    def _speech_due(self, slot: int) -> bool:
        """Whether `slot` belongs to scheduled speech (an open clip's slots all do, until
        it ends). Caller holds the lock."""
        if slot < self.speech_until:
            return True
        c = self.clips[0] if self.clips else None
        return c is not None and c.slot0 is not None and not c.ended and slot >= c.slot0

    def _room(self) -> bool:
        return self.realtime or len(self.out) < self.settings.max_queued_frames

    def _maybe_flush(self, clip: Clip) -> None:
        """Realtime: end a clip the player is waiting on when its audio has stopped."""
        if (
            self.realtime
            and not clip.ended
            and self.player_waiting
            and time.monotonic() - clip.last_audio > self.settings.gap_flush_ms / 1000
        ):
            log.debug(
                "clip %d: no audio for %.0f ms, flushing", clip.id, self.settings.gap_flush_ms
            )
            self._end_clip(clip)

    def _schedule(self, clip: Clip) -> int:
        """Timeline slot of a clip's first frame. Caller holds the lock.

        Realtime: the first slot that leaves time to make the frames (the moving average
        of a batch's production time, from planning to JPEG) plus `jitter_ms`; after any
        speech already scheduled.
        """
        if not self.realtime:
            return self.speech_until
        ready_at = time.monotonic() + (self.batch_ms + self.settings.jitter_ms) / 1000
        slot = math.ceil((ready_at - self.clock0) / self.frame_s)
        return max(slot, self.player_slot, self.speech_until)

    def produce(self) -> None:
        try:
            while True:
                plan = self._plan()
                if plan is None:
                    break
                clip, gen, first, stop, slots = plan
                t0 = time.perf_counter()
                planned = self._infer(clip, gen, first, stop, slots)
                planned.started = t0
                self._handoff.put(planned)
        except Exception as exc:
            self.fail(exc)
        finally:
            self._handoff.put(None)

    def _infer(self, clip: Clip, gen: int, first: int, stop: int, slots: list[int]) -> _Planned:
        n_bg = self.avatar.count
        backgrounds = [pingpong(self.start.start_frame_idx + s, n_bg) for s in slots]
        with self.cond:
            offset = audio.tail_offset(first)
            end = clip.samples.length
            pcm = clip.samples.get(offset, end)
            spans = [
                clip.samples.get(
                    i * SAMPLES_PER_FRAME - SPEECH_SPAN, i * SAMPLES_PER_FRAME + SPEECH_SPAN
                )
                for i in range(first, stop)
            ]
            own = [
                clip.samples.get(i * SAMPLES_PER_FRAME, (i + 1) * SAMPLES_PER_FRAME)
                for i in range(first, stop)
            ]
            arrivals = [
                clip.arrival_of(i) if not clip.ended else clip.last_audio
                for i in range(first, stop)
            ]
            clip.forget_before(stop)
        batch = self.compositor.crops(self.avatar, backgrounds)
        req = ipb.InferRequest(
            model_id=self.start.model_id,
            batch_size=stop - first,
            face_crops=batch.inner.tobytes(),
            clip=ipb.AudioClip(
                pcm=pcm.tobytes(), sample_rate=audio.SAMPLE_RATE, sample_offset=offset
            ),
            clip_frame_offset=first,
        )
        mouths = self.inference.infer(req)
        flags = [bool(len(s)) and float(np.sqrt(np.mean(s * s))) > SPEECH_RMS for s in spans]
        audio_bytes = [
            (np.clip(np.pad(a, (0, SAMPLES_PER_FRAME - len(a))), -1, 1) * 32767)
            .astype("<i2")
            .tobytes()
            if self.start.return_audio
            else b""
            for a in own
        ]
        return _Planned(
            clip,
            gen,
            first,
            slots,
            backgrounds,
            batch.crops,
            mouths.pixels,
            flags,
            audio_bytes,
            arrivals,
        )

    def composite(self) -> None:
        try:
            while True:
                p = self._handoff.get()
                if p is None:
                    break
                jpegs = self.compositor.composite(self.avatar, p.backgrounds, p.mouths, p.crops)
                ms = (time.perf_counter() - p.started) * 1000
                with self.cond:
                    self.batch_ms = 0.8 * self.batch_ms + 0.2 * ms
                    if p.generation != self.generation:
                        continue  # interrupted while in flight
                    for k, jpeg in enumerate(jpegs):
                        self.out.append(
                            OutFrame(
                                p.slots[k],
                                jpeg,
                                p.flags[k],
                                p.clip.id,
                                p.first + k,
                                p.backgrounds[k],
                                p.audio[k],
                                p.arrivals[k],
                            )
                        )
                    self.cond.notify_all()
        except Exception as exc:
            self.fail(exc)
        finally:
            with self.cond:
                self.production_done = True
                self.cond.notify_all()

    # -- output (the RPC's response generator) ------------------------------------------
    def frames(self) -> Iterator[cpb.StreamFrame]:
        threads = [
            threading.Thread(target=self.produce, name="stream-produce", daemon=True),
            threading.Thread(target=self.composite, name="stream-composite", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            yield from (self._realtime() if self.realtime else self._offline())
        finally:
            self.cancel()

    def _message(self, f: OutFrame | None, slot: int) -> cpb.StreamFrame:
        if f is None:
            bg = pingpong(self.start.start_frame_idx + slot, self.avatar.count)
            silence = bytes(2 * SAMPLES_PER_FRAME) if self.start.return_audio else b""
            return cpb.StreamFrame(
                index=slot,
                jpeg=self.idle_jpeg(bg),
                pts_ms=slot * 1000.0 / self.avatar.fps,
                speech=False,
                generated=False,
                clip=-1,
                clip_frame=-1,
                background_frame=bg,
                audio=silence,
            )
        return cpb.StreamFrame(
            index=slot,
            jpeg=f.jpeg,
            pts_ms=slot * 1000.0 / self.avatar.fps,
            speech=f.speech,
            generated=True,
            clip=f.clip,
            clip_frame=f.clip_frame,
            background_frame=f.background,
            audio=f.audio,
            latency_ms=(time.monotonic() - f.arrival) * 1000,
        )

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _offline(self) -> Iterator[cpb.StreamFrame]:
        while True:
            with self.cond:
                while not self.out and not (self.production_done and self.input_closed):
                    self._raise_if_failed()
                    self.cond.wait(0.5)
                self._raise_if_failed()
                if not self.out:
                    return
                f = self.out.popleft()
                self.cond.notify_all()
            yield self._message(f, f.slot)

    def _realtime(self) -> Iterator[cpb.StreamFrame]:
        t0 = self.clock0 = time.monotonic()
        slot = 0
        while True:
            due = t0 + slot * self.frame_s
            with self.cond:
                self._raise_if_failed()
                # drop frames of slots already passed (after an interrupt nothing is kept)
                while self.out and self.out[0].slot < slot:
                    self.out.popleft()
                frame = None
                if self._speech_due(slot):
                    self.player_waiting = True
                    while not (self.out and self.out[0].slot == slot) and self._speech_due(slot):
                        self._raise_if_failed()
                        if self.production_done and not self.out:
                            break
                        self.cond.wait(0.01)
                        while self.out and self.out[0].slot < slot:
                            self.out.popleft()
                    self.player_waiting = False
                    if self.out and self.out[0].slot == slot:
                        frame = self.out.popleft()
                elif self.input_closed and self.production_done and not self.out and not self.clips:
                    return
                self.player_slot = slot + 1
                self.cond.notify_all()
            now = time.monotonic()
            if frame is None and now > due + 2 * self.frame_s:
                slot += 1  # behind (slow client): skip an idle frame to get back on the clock
                continue
            if due > now:
                time.sleep(due - now)
            yield self._message(frame, slot)
            slot += 1
