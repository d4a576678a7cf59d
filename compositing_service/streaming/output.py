"""Output stages: made frames to the client's `StreamFrame`s. The only place that paces,
sleeps or makes idle frames.

- `OfflineSink`: speech frames only, in the order they were made, as fast as the client
  takes them; at most `capacity` made but unsent frames (`put` waits for room: the
  pipeline's backpressure).
- `RealtimePacer`: one frame per slot at the avatar's fps, by presentation time: the
  slot's speech frame when speech is due there (it waits for it), else an idle frame; a
  player more than two frames behind the clock skips idle slots to catch up. It counts
  what it does off the clock (`PaceCounts`, and the optional `on_event` callback the
  service's metrics hang on: streaming/ imports no metrics library): a skipped slot, and
  a late frame (sent more than `LATE_AFTER_FRAMES` frame intervals after its slot was due).

Both take frames from the composite stage (`put`), are told when production ends
(`finish`), fails (`fail`, raised to the client) or is cancelled, and drop their queued
frames on an interrupt (`interrupt`; frames of an older epoch are refused from then on).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from compositing_service.streaming.composite_stage import OutFrame
from compositing_service.streaming.schedule import Schedule
from lipsync.core.audio import SAMPLES_PER_FRAME
from lipsync.core.timeline import pingpong
from lipsync.proto import compositing_pb2 as cpb

# A frame sent more than this many frame intervals after its slot was due is late (one
# interval: the frame is already on screen in the next slot's time).
LATE_AFTER_FRAMES = 1.0

# The pacer's events (`RealtimePacer.on_event`): a slot skipped to catch up with the clock
# (always an idle one), a frame sent late.
SKIPPED = "skipped"
LATE = "late"


@dataclass
class PaceCounts:
    """What a realtime stream's pacer did off the clock so far."""

    skipped: int = 0  # idle slots skipped to catch up with the clock
    late: int = 0  # frames sent more than LATE_AFTER_FRAMES intervals after their slot


class VideoEncoder(Protocol):
    """A stream's video encoder (compositing_service/video_encoder.py): one picture in,
    one access unit and its keyframe flag out, in the order the frames are sent."""

    def encode(self, bgr: np.ndarray) -> tuple[bytes, bool]: ...


class FrameMessages:
    """`StreamFrame` messages of a stream's slots: the JPEG of each frame, or with an
    `encoder` (H.264 streams) its access unit, encoded here, as the message is made, so
    the encoder sees exactly the frames sent, in order (`idle_image(i)`: background frame
    i's picture, for idle frames)."""

    def __init__(
        self,
        fps: float,
        background_count: int,
        start_frame_idx: int,
        idle_jpeg: Callable[[int], bytes],
        return_audio: bool,
        clock: Callable[[], float] = time.monotonic,
        *,
        encoder: VideoEncoder | None = None,
        idle_image: Callable[[int], np.ndarray] | None = None,
    ):
        if (encoder is None) != (idle_image is None):
            raise ValueError("an encoder needs idle_image, and idle_image an encoder")
        self.fps = fps
        self.background_count = background_count
        self.start_frame_idx = start_frame_idx
        self.idle_jpeg = idle_jpeg
        self.encoder = encoder
        self.idle_image = idle_image
        self.silence = bytes(2 * SAMPLES_PER_FRAME) if return_audio else b""
        self._clock = clock

    def _picture(self, msg: cpb.StreamFrame, image: np.ndarray | None, jpeg: bytes) -> None:
        if self.encoder is None:
            msg.jpeg = jpeg
            return
        if image is None:
            raise RuntimeError("an H.264 stream got a frame without its picture")
        msg.h264, msg.keyframe = self.encoder.encode(image)

    def speech(self, f: OutFrame) -> cpb.StreamFrame:
        msg = cpb.StreamFrame(
            index=f.slot,
            pts_ms=f.slot * 1000.0 / self.fps,
            speech=f.speech,
            generated=True,
            clip=f.clip,
            clip_frame=f.clip_frame,
            background_frame=f.background,
            audio=f.audio,
        )
        self._picture(msg, f.image, f.jpeg)
        msg.latency_ms = (self._clock() - f.arrival) * 1000
        return msg

    def idle(self, slot: int) -> cpb.StreamFrame:
        bg = pingpong(self.start_frame_idx + slot, self.background_count)
        msg = cpb.StreamFrame(
            index=slot,
            pts_ms=slot * 1000.0 / self.fps,
            speech=False,
            generated=False,
            clip=-1,
            clip_frame=-1,
            background_frame=bg,
            audio=self.silence,
        )
        if self.encoder is None or self.idle_image is None:
            msg.jpeg = self.idle_jpeg(bg)
        else:
            msg.h264, msg.keyframe = self.encoder.encode(self.idle_image(bg))
        return msg


class _Cancelled(Exception):
    pass


class _Output:
    """The queue of made frames and the end-of-stream state both outputs share."""

    def __init__(self, messages: FrameMessages, schedule: Schedule):
        self.messages = messages
        self.schedule = schedule
        self._cond = threading.Condition()
        self._queue: deque[OutFrame] = deque()
        self._epoch = 0
        self._done = False  # production ended: nothing more will be put
        self._error: BaseException | None = None
        self._cancelled = False

    def _full(self) -> bool:
        return False

    def put(self, frames: list[OutFrame]) -> bool:
        """Queue made frames (one batch, in order); False once cancelled. Frames of an
        epoch before the last interrupt are dropped."""
        with self._cond:
            while self._full() and not self._cancelled and not self._stale(frames):
                self._cond.wait(0.5)
            if self._cancelled:
                return False
            if not self._stale(frames):
                self._queue.extend(frames)
                self._cond.notify_all()
            return True

    def _stale(self, frames: list[OutFrame]) -> bool:
        return bool(frames) and frames[0].epoch < self._epoch

    def interrupt(self, epoch: int) -> None:
        with self._cond:
            self._epoch = epoch
            self._queue.clear()
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        """The stream failed: `frames` raises `exc` (the first failure wins)."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _check(self) -> None:
        """Caller holds the lock."""
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise _Cancelled

    def frames(self) -> Iterator[cpb.StreamFrame]:
        try:
            yield from self._frames()
        except _Cancelled:
            return

    def _frames(self) -> Iterator[cpb.StreamFrame]:
        raise NotImplementedError


class OfflineSink(_Output):
    def __init__(self, messages: FrameMessages, schedule: Schedule, capacity: int):
        super().__init__(messages, schedule)
        self.capacity = max(1, capacity)

    def _full(self) -> bool:
        return len(self._queue) >= self.capacity

    def _frames(self) -> Iterator[cpb.StreamFrame]:
        while True:
            with self._cond:
                while not self._queue and not self._done:
                    self._check()
                    self._cond.wait(0.5)
                self._check()
                if not self._queue:
                    return
                f = self._queue.popleft()
                self.schedule.passed(f.slot)
                self._cond.notify_all()  # room for `put`
            yield self.messages.speech(f)


class RealtimePacer(_Output):
    def __init__(
        self,
        messages: FrameMessages,
        schedule: Schedule,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.01,
        capacity: int = 0,
        on_event: Callable[[str], None] | None = None,
    ):
        super().__init__(messages, schedule)
        self._clock = clock
        # `on_event(SKIPPED | LATE)`, once per skipped slot / late frame, from the thread
        # that iterates `frames` (it must not block: it runs on the stream's clock)
        self.on_event = on_event
        self.counts = PaceCounts()
        self._sleep = sleep
        self._poll_s = poll_s
        # made but unsent frames before `put` waits (0: no bound): a sender that runs
        # ahead of the clock is held back here, then at the ingest (backpressure)
        self.capacity = capacity

    def _full(self) -> bool:
        return bool(self.capacity) and len(self._queue) >= self.capacity

    def _drop_before(self, slot: int) -> None:
        """Frames of slots the player has left (none unless an interrupt raced them)."""
        while self._queue and self._queue[0].slot < slot:
            self._queue.popleft()

    def _head_is(self, slot: int) -> bool:
        return bool(self._queue) and self._queue[0].slot == slot

    def _await_speech(self, slot: int) -> OutFrame | None:
        """The speech frame of `slot`, waiting for it while speech is due there; None if
        it stopped being due (interrupt, the clip ended before it) or cannot come.
        Caller holds the lock."""
        self.schedule.set_waiting(True)
        try:
            while True:
                self._drop_before(slot)
                if self._head_is(slot):
                    self.schedule.passed(slot)
                    self._cond.notify_all()  # room for `put`
                    return self._queue.popleft()
                if not self.schedule.due_or_pass(slot):
                    return None
                self._check()
                if self._done:  # nothing more will come
                    self.schedule.passed(slot)
                    return None
                self._cond.wait(self._poll_s)
        finally:
            self.schedule.set_waiting(False)

    def _event(self, kind: str) -> None:
        if kind == SKIPPED:
            self.counts.skipped += 1
        else:
            self.counts.late += 1
        if self.on_event is not None:
            self.on_event(kind)

    def _frames(self) -> Iterator[cpb.StreamFrame]:
        t0 = self._clock()
        self.schedule.start(t0)
        frame_s = self.schedule.frame_s
        slot = 0
        while True:
            due = t0 + slot * frame_s
            with self._cond:
                self._check()
                self._drop_before(slot)
                if self.schedule.due_or_pass(slot):
                    frame = self._await_speech(slot)
                elif self._done and not self._queue:
                    return
                else:
                    frame = None
            if frame is None and self._clock() > due + 2 * frame_s:
                slot += 1  # behind (slow client): skip an idle frame to get back on the clock
                self._event(SKIPPED)
                continue
            # made (an H.264 stream encodes it here) before waiting for its time, so the
            # encode does not delay it
            msg = self.messages.speech(frame) if frame is not None else self.messages.idle(slot)
            now = self._clock()
            if due > now:
                self._sleep(due - now)
            elif now - due > LATE_AFTER_FRAMES * frame_s:
                self._event(LATE)
            if frame is not None:
                msg.latency_ms = (self._clock() - frame.arrival) * 1000  # at its sending
            yield msg
            slot += 1
