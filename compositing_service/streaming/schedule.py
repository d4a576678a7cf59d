"""The stream's schedule: which timeline slots speech occupies and where the player is.

Shared by the planner (it places clips on the timeline) and the output stage (it moves
the player along it); one small lock makes "place a clip after the player" and "give the
player's slot to an idle frame" exclusive, so a speech frame is never placed on a slot
the player already left.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class _Span:
    """The slots of one placed clip: [start, stop); stop None while the clip still grows
    (then every slot from start on is due)."""

    start: int
    stop: int | None

    def holds(self, slot: int) -> bool:
        return self.start <= slot and (self.stop is None or slot < self.stop)


class Schedule:
    def __init__(self, fps: float, clock0: float = 0.0):
        self.frame_s = 1.0 / fps
        self._lock = threading.Lock()
        self._clock0 = clock0  # when slot 0 is due (realtime)
        self._player = 0  # the slot the player emits next
        self._waiting = False  # the player waits for a speech frame that is due
        self._speech: deque[_Span] = deque()  # placed clips the player has not passed
        self._speech_until = 0  # the slot after the last placed, ended clip

    # -- the output stage ------------------------------------------------------------------
    def start(self, clock0: float) -> None:
        """The player starts: slot s is due at clock0 + s / fps."""
        with self._lock:
            self._clock0 = clock0

    def due_or_pass(self, slot: int) -> bool:
        """True if `slot` belongs to placed speech; otherwise the player leaves it (to an
        idle frame or a skip): from now on no clip is placed at or before it."""
        with self._lock:
            if self._due(slot):
                return True
            self._advance(slot)
            return False

    def passed(self, slot: int) -> None:
        """The player emitted `slot`."""
        with self._lock:
            self._advance(slot)

    def set_waiting(self, waiting: bool) -> None:
        with self._lock:
            self._waiting = waiting

    def speech_due(self, slot: int) -> bool:
        with self._lock:
            return self._due(slot)

    # -- the planner -----------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        with self._lock:
            return self._waiting

    @property
    def player(self) -> int:
        with self._lock:
            return self._player

    def slot_at(self, t: float) -> int:
        """The first slot due at or after time `t`."""
        with self._lock:
            return math.ceil((t - self._clock0) / self.frame_s)

    def place(self, earliest: int, total: int | None) -> int:
        """Place a clip: its frame 0 takes the first slot from `earliest` on that is after
        the player and after the speech placed before; `total`: its frame count if it has
        ended (else its slots stay due until `close`). Returns that slot."""
        with self._lock:
            slot0 = max(earliest, self._player, self._speech_until)
            stop = None if total is None else slot0 + total
            self._speech.append(_Span(slot0, stop))
            if stop is not None:
                self._speech_until = stop
            return slot0

    def close(self, slot0: int, total: int) -> None:
        """The clip placed at `slot0` ended with `total` frames."""
        with self._lock:
            for span in self._speech:
                if span.start == slot0 and span.stop is None:
                    span.stop = slot0 + total
            self._speech_until = max(self._speech_until, slot0 + total)

    def interrupt(self) -> None:
        """Placed speech is dropped: slots from the player's on are free."""
        with self._lock:
            self._speech.clear()
            self._speech_until = self._player

    # -- under the lock --------------------------------------------------------------------
    def _due(self, slot: int) -> bool:
        return any(span.holds(slot) for span in self._speech)

    def _advance(self, slot: int) -> None:
        self._player = max(self._player, slot + 1)
        while self._speech and self._speech[0].stop is not None:
            if self._speech[0].stop > self._player:
                break
            self._speech.popleft()
