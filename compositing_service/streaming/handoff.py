"""A small bounded hand-off between two stage threads, closable from either end."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._closed = False  # the producer is done: `get` drains, then returns None
        self._cancelled = False  # drop everything: `put` and `get` return at once

    def put(self, item: T) -> bool:
        """Wait for room and hand `item` over; False if the hand-off was cancelled."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self) -> T | None:
        """The next item; None once closed and drained, or cancelled."""
        with self._cond:
            while not self._items and not (self._closed or self._cancelled):
                self._cond.wait()
            if self._cancelled or not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()
