"""Dynamic batching: concurrent requests to one network are coalesced into runs of up
to `max_batch` rows, waiting at most `max_wait_s` for more work to join a run.

A worker thread per batcher runs the network; it starts on the first request and ends
after `idle_exit_s` without work, so a batcher needs no explicit shutdown (an evicted
model's batcher simply goes quiet). Requests larger than `max_batch` are split into
chunks, queued together, and reassembled in order. Each row is computed by the same
network on the same inputs whatever batch it lands in.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RunFn = Callable[..., np.ndarray]

log = logging.getLogger(__name__)


class Expired(Exception):
    """The caller's deadline passed, or the caller left, while its rows were queued: they
    were dropped, not run."""


@dataclass(frozen=True)
class CallerScope:
    """The caller the current thread works for: `deadline` (time.monotonic(); None: none)
    and `alive()` (False once it cancelled). Set by the servicer around a request."""

    deadline: float | None = None
    alive: Callable[[], bool] | None = None

    def gone(self, now: float | None = None) -> str | None:
        """Why the caller's work should be dropped, or None."""
        if self.deadline is not None and (now or time.monotonic()) >= self.deadline:
            return "the caller's deadline passed"
        if self.alive is not None and not self.alive():
            return "the caller cancelled"
        return None


caller_scope: contextvars.ContextVar[CallerScope | None] = contextvars.ContextVar(
    "caller_scope", default=None
)


@dataclass
class BatchRun:
    """One run of a batcher as its `events` listener sees it (metrics, tracing)."""

    name: str
    rows: int
    waits_s: list[float]  # per joined request: queued -> run start
    run_s: float
    started_ns: float  # time.time_ns() at run start
    contexts: list[contextvars.Context]  # each joined caller's context (its trace span)
    error: BaseException | None


@dataclass
class _Item:
    arrays: tuple[np.ndarray, ...]
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    context: contextvars.Context | None = None
    scope: CallerScope | None = None  # dropped at the run's start if the caller has gone
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
    expired: int = 0  # queued items dropped because their caller had gone

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
        # Called with a BatchRun after each run (lipsync.serving.metrics / lipsync.serving.tracing).
        self.events: Callable[[BatchRun], None] | None = None

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        """Run the network on rows of `arrays` (all with the same first dimension)."""
        n = len(arrays[0])
        now = time.perf_counter()
        ctx = contextvars.copy_context() if self.events is not None else None
        scope = caller_scope.get()
        if scope is not None and (why := scope.gone()):
            raise Expired(why)
        items = [
            _Item(tuple(a[i : i + self.max_batch] for a in arrays), now, context=ctx, scope=scope)
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
            now = time.monotonic()
            while self._queue and rows + self._queue[0].rows <= self.max_batch:
                it = self._queue.popleft()
                why = it.scope.gone(now) if it.scope is not None else None
                if why is not None:  # its caller has gone: dropped, not run
                    it.error = Expired(why)
                    it.done.set()
                    self.stats.expired += 1
                    continue
                taken.append(it)
                rows += it.rows
            return taken

    def _loop(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            if not items:  # every item taken had expired
                continue
            t_run, started_ns = time.perf_counter(), time.time_ns()
            error = None
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
                error = exc
                for it in items:
                    it.error = exc
            self.stats.runs += 1
            self.stats.rows += sum(i.rows for i in items)
            run_s = time.perf_counter() - t_run
            for it in items:
                it.done.set()
            events = self.events
            if events is not None:
                run = BatchRun(
                    self.name,
                    sum(i.rows for i in items),
                    [t_run - i.enqueued for i in items],
                    run_s,
                    started_ns,
                    [i.context for i in items if i.context is not None],
                    error,
                )
                try:
                    events(run)
                except Exception:
                    log.exception("batch events listener failed")
