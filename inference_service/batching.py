"""Dynamic batching: concurrent requests to one network are coalesced into runs of up
to `max_batch` rows, waiting at most `max_wait_s` for more work to join a run.

A worker thread per batcher runs the network; it starts on the first request and ends
after `idle_exit_s` without work, so a batcher needs no explicit shutdown (an evicted
model's batcher simply goes quiet). Requests larger than `max_batch` are split into
chunks, queued together, and reassembled in order. Each row is computed by the same
network on the same inputs whatever batch it lands in.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[..., np.ndarray]


@dataclass
class _Item:
    arrays: tuple[np.ndarray, ...]
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.arrays[0])


@dataclass
class BatcherStats:
    runs: int = 0
    rows: int = 0
    requests: int = 0

    @property
    def mean_batch(self) -> float:
        return self.rows / self.runs if self.runs else 0.0


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        max_batch: int,
        max_wait_s: float,
        name: str = "batcher",
        idle_exit_s: float = 2.0,
    ):
        self._run = run
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.name = name
        self.idle_exit_s = idle_exit_s
        self._cv = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._worker: threading.Thread | None = None
        self.stats = BatcherStats()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        """Run the network on rows of `arrays` (all with the same first dimension)."""
        n = len(arrays[0])
        now = time.perf_counter()
        items = [
            _Item(tuple(a[i : i + self.max_batch] for a in arrays), now)
            for i in range(0, n, self.max_batch)
        ]
        with self._cv:
            self._queue.extend(items)
            self.stats.requests += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._worker.start()
            self._cv.notify_all()
        for it in items:
            it.done.wait()
            if it.error is not None:
                raise it.error
        if len(items) == 1:
            assert items[0].result is not None
            return items[0].result
        return np.concatenate([it.result for it in items if it.result is not None])

    def _take(self) -> list[_Item] | None:
        """Wait for work and collect one run's items; None when idle long enough to exit."""
        with self._cv:
            while not self._queue:
                if not self._cv.wait(self.idle_exit_s) and not self._queue:
                    self._worker = None
                    return None
            deadline = self._queue[0].enqueued + self.max_wait_s
            while sum(i.rows for i in self._queue) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            taken, rows = [], 0
            while self._queue and rows + self._queue[0].rows <= self.max_batch:
                it = self._queue.popleft()
                taken.append(it)
                rows += it.rows
            return taken

    def _loop(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            try:
                if len(items) == 1:
                    out = self._run(*items[0].arrays)
                else:
                    joined = [
                        np.concatenate(parts)
                        for parts in zip(*(i.arrays for i in items), strict=True)
                    ]
                    out = self._run(*joined)
                at = 0
                for it in items:
                    it.result = out[at : at + it.rows]
                    at += it.rows
            except BaseException as exc:
                for it in items:
                    it.error = exc
            self.stats.runs += 1
            self.stats.rows += sum(i.rows for i in items)
            for it in items:
                it.done.set()
