"""Readiness planning: which frames of which clip to make next, and on which slots.

The planner holds the clips the ingest stage handed it, in order, and only ever plans
the oldest one: a batch is its next frames that are final (`Clip.ready`: the clip's
audio reaches their lookahead, or the clip ended), at most `max_batch` of them. When a
clip's first batch is planned the clip is placed on the timeline (`Schedule.place`):
offline right after the speech before it; realtime at the first slot that leaves time to
make the frames (the measured production time of a batch plus `jitter_ms`). In realtime
mode it also ends a clip the player is waiting on when its audio stopped for
`gap_flush_ms` (a pause in speech).

`plan(now)` never blocks (for tests and for other threading); `next_batch()` waits for
one. Every method holds the planner's lock; the ingest stage calls the `ClipSink`
methods from the reader thread, the session's producer thread calls `next_batch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from compositing_service.streaming.ingest import AudioTail, Clip
from compositing_service.streaming.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Frames `first .. stop - 1` of clip `clip`, on slots `slot ..`."""

    epoch: int  # the interrupt epoch it was planned in
    clip: int
    first: int
    stop: int
    slot: int  # timeline slot of frame `first`
    tail: AudioTail  # the clip audio these frames need
    arrivals: list[float]  # when each frame's last needed audio arrived
    planned_at: float

    @property
    def size(self) -> int:
        return self.stop - self.first

    @property
    def slots(self) -> list[int]:
        return list(range(self.slot, self.slot + self.size))


@dataclass
class _Cursor:
    clip: Clip
    next_frame: int = 0  # next frame to plan
    slot0: int | None = None  # slot of frame 0, once placed


class Planner:
    def __init__(
        self,
        schedule: Schedule,
        *,
        realtime: bool,
        max_batch: int,
        jitter_ms: float,
        gap_flush_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.schedule = schedule
        self.realtime = realtime
        self.max_batch = max(1, max_batch)
        self.jitter_ms = jitter_ms
        self.gap_flush_ms = gap_flush_ms
        self._clock = clock
        self._cond = threading.Condition()
        self._clips: deque[_Cursor] = deque()
        self._closed = False  # no more clips will come
        self._stopped = False  # cancelled or failed: plan nothing more
        self._epoch = 0
        self.batch_ms = 40.0  # moving average of a batch's production time (plan to JPEG)

    # -- the ingest stage's hand-offs (ClipSink) -----------------------------------------
    def clip_started(self, clip: Clip) -> None:
        with self._cond:
            self._clips.append(_Cursor(clip))
            self._cond.notify_all()

    def clip_grew(self, clip: Clip) -> None:
        with self._cond:
            self._cond.notify_all()

    def clip_ended(self, clip: Clip) -> None:
        with self._cond:
            for cur in self._clips:
                if cur.clip is clip:
                    self._ended(cur)
                    break
            self._cond.notify_all()

    def input_closed(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- events ----------------------------------------------------------------------------
    def interrupt(self, epoch: int) -> None:
        """Drop every clip and the speech placed on the timeline."""
        with self._cond:
            self._epoch = epoch
            self._clips.clear()
            self.schedule.interrupt()
            self._cond.notify_all()

    def stop(self) -> None:
        """Cancel or failure: `next_batch` returns None from now on."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def record_production(self, ms: float) -> None:
        """A batch took `ms` from planning to its JPEGs."""
        with self._cond:
            self.batch_ms = 0.8 * self.batch_ms + 0.2 * ms

    # -- planning --------------------------------------------------------------------------
    def next_batch(self) -> Batch | None:
        """Wait for the next batch; None when all input is planned, or stopped."""
        with self._cond:
            while not self._stopped:
                batch = self._plan(self._clock())
                if batch is not None:
                    return batch
                if self._closed and not self._clips:
                    return None
                self._cond.wait(0.02 if self.realtime else 0.5)
            return None

    def plan(self, now: float | None = None) -> Batch | None:
        """The next batch if one is ready now (never waits)."""
        with self._cond:
            if self._stopped:
                return None
            return self._plan(self._clock() if now is None else now)

    @property
    def done(self) -> bool:
        """All input has been planned."""
        with self._cond:
            return self._closed and not self._clips

    def _plan(self, now: float) -> Batch | None:
        while self._clips and self._clips[0].clip.ended:
            head = self._clips[0]
            if head.next_frame < head.clip.total:
                break
            self._clips.popleft()
        if not self._clips:
            return None
        cur = self._clips[0]
        clip = cur.clip
        self._maybe_flush(cur, now)
        ready = clip.ready()
        if ready <= cur.next_frame:
            return None
        first = cur.next_frame
        stop = min(ready, first + self.max_batch)
        if cur.slot0 is None:
            total = clip.total if clip.ended else None  # else: the span stays open
            cur.slot0 = self.schedule.place(self._earliest(now), total)
        elif clip.ended:
            self.schedule.close(cur.slot0, clip.total)
        cur.next_frame = stop
        tail, arrivals = clip.take(first, stop)
        return Batch(self._epoch, clip.id, first, stop, cur.slot0 + first, tail, arrivals, now)

    def _earliest(self, now: float) -> int:
        """The first slot a clip placed now could start at (realtime: time to make its
        first batch plus jitter from now; offline: any)."""
        if not self.realtime:
            return 0
        return self.schedule.slot_at(now + (self.batch_ms + self.jitter_ms) / 1000)

    def _maybe_flush(self, cur: _Cursor, now: float) -> None:
        """Realtime: end a clip the player is waiting on when its audio has stopped."""
        clip = cur.clip
        if (
            self.realtime
            and not clip.ended
            and self.schedule.waiting
            and now - clip.last_audio > self.gap_flush_ms / 1000
            and clip.end()
        ):
            log.debug("clip %d: no audio for %.0f ms, flushing", clip.id, self.gap_flush_ms)
            self._ended(cur)

    def _ended(self, cur: _Cursor) -> None:
        total = cur.clip.total
        if cur.slot0 is not None:
            self.schedule.close(cur.slot0, total)
        if total == 0:
            self._clips.remove(cur)
