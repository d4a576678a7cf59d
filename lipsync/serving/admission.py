"""Load shedding and fault handling both services share (docs/RELIABILITY.md):

- `Admission`: a bound on the work in progress (frames and bytes); a request past it is
  refused at once (RESOURCE_EXHAUSTED with a `retry-after-ms` hint) instead of queueing,
  so the admitted requests keep their latency and a caller can go elsewhere or retry.
- `RateLimitedLog`: unexpected errors logged with their traceback, at most a few per
  interval (the rest are counted and summarised), so hostile input cannot flood the log.
- `HealthWatcher`: readiness that follows a dependency's health (the compositing
  service is not ready while it cannot reach the inference service).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

RETRY_AFTER_KEY = "retry-after-ms"


class Overloaded(Exception):
    """Refused by admission control; `retry_after_ms` is the hint given to the caller."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)


class Admission:
    """At most `max_frames` frames and `max_bytes` request bytes in progress. One request
    larger than the bound alone is still admitted when nothing else runs (it is valid)."""

    def __init__(self, name: str, max_frames: int, max_bytes: int, retry_after_ms: int):
        self.name = name
        self.max_frames = max(1, max_frames)
        self.max_bytes = max(1, max_bytes)
        self.retry_after_ms = retry_after_ms
        self._lock = threading.Lock()
        self.frames = 0
        self.bytes = 0
        self.requests = 0
        self.refused = 0
        self.closed = False

    @contextlib.contextmanager
    def admit(self, frames: int, nbytes: int = 0) -> Iterator[None]:
        with self._lock:
            if self.closed:
                self.refused += 1
                raise Overloaded(f"{self.name} is shutting down", self.retry_after_ms)
            busy = self.requests > 0
            if busy and (
                self.frames + frames > self.max_frames or self.bytes + nbytes > self.max_bytes
            ):
                self.refused += 1
                raise Overloaded(
                    f"{self.name} is at capacity ({self.frames} frames in progress); "
                    f"retry in {self.retry_after_ms} ms",
                    self.retry_after_ms,
                )
            self.frames += frames
            self.bytes += nbytes
            self.requests += 1
        try:
            yield
        finally:
            with self._lock:
                self.frames -= frames
                self.bytes -= nbytes
                self.requests -= 1

    def close(self) -> None:
        """Refuse every request from now on (shutdown)."""
        with self._lock:
            self.closed = True

    def idle(self) -> bool:
        with self._lock:
            return self.requests == 0


class RateLimitedLog:
    """`error(msg, exc)`: with the traceback for the first `burst` per `interval_s`, then
    one summary line per interval of how many were left out."""

    def __init__(self, log: logging.Logger, burst: int = 5, interval_s: float = 60.0):
        self.log = log
        self.burst = burst
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._window = 0.0
        self._count = 0
        self._dropped = 0

    def error(self, msg: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.interval_s:
                dropped, self._dropped = self._dropped, 0
                self._window, self._count = now, 0
                if dropped:
                    self.log.error("%d more internal errors in the last interval", dropped)
            self._count += 1
            if self._count > self.burst:
                self._dropped += 1
                return
        self.log.error(msg, exc_info=exc)


class HealthWatcher:
    """Every `interval_s`, `check()` (e.g. the inference service's standard health);
    `on_change(ok)` when the answer changes (first call: at the first check)."""

    def __init__(
        self,
        check: Callable[[], bool],
        on_change: Callable[[bool], None],
        interval_s: float,
        name: str = "health-watch",
    ):
        self.check = check
        self.on_change = on_change
        self.interval_s = interval_s
        self.ok: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> HealthWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = bool(self.check())
            except Exception:
                ok = False
            if ok != self.ok:
                self.ok = ok
                try:
                    self.on_change(ok)
                except Exception:
                    logging.getLogger(__name__).exception("health change listener failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def set_health(health_servicer, names: Sequence[str], serving: bool) -> None:  # type: ignore[no-untyped-def]
    """Set the standard health status of `names` (ignored after graceful shutdown)."""
    from grpc_health.v1 import health_pb2

    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in names:
        health_servicer.set(name, status)


class _UndecodableMessageFilter(logging.Filter):
    """grpc logs every request it cannot parse with a full traceback at ERROR ("Exception
    deserializing message!"): a hostile client floods the log. Rewritten here as one INFO
    line with the parser's message, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "deserializing" in str(record.msg) and record.exc_info:
            exc = record.exc_info[1]
            record.msg = "undecodable request message: %s"
            record.args = (str(exc)[:200],)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_undecodable_messages() -> None:
    """Install the filter above on grpc's loggers (idempotent)."""
    for name in ("grpc._common", "grpc._server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UndecodableMessageFilter) for f in logger.filters):
            logger.addFilter(_UndecodableMessageFilter())
