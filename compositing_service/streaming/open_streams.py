"""The compositing service's open streams: how many StreamComposite calls may run at once,
the sessions running, and what shutdown does to them (docs/RELIABILITY.md).

A stream is counted from before its first message is read (`enter`, `leave`), so streams
hold at most `stream.max_sessions` handler threads (the server has that many more than
`compositing.max_workers`: unary calls and health checks always find one). A stream past
the bound is refused at once (`Overloaded`: RESOURCE_EXHAUSTED with the retry hint), and
every stream once shutdown began (`StreamsClosed`: UNAVAILABLE).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from compositing_service.streaming.session import StreamSession
from lipsync.serving.admission import Overloaded


class StreamsClosed(Exception):
    """The service is shutting down: no new stream starts."""


class OpenStreams:
    def __init__(self, max_sessions: int, retry_after_ms: int):
        self.max_sessions = max_sessions
        self.retry_after_ms = retry_after_ms
        self._lock = threading.Lock()
        self._count = 0
        self._sessions: set[StreamSession] = set()
        self._draining = False

    @property
    def count(self) -> int:
        """Streams open now (counted from before their first message)."""
        with self._lock:
            return self._count

    def enter(self) -> None:
        """Take one of the `max_sessions` stream slots (give it back with `leave`);
        raises `StreamsClosed` once shutdown began, `Overloaded` when every slot is
        taken."""
        with self._lock:
            if self._draining:
                raise StreamsClosed("the service is shutting down")
            if self._count >= self.max_sessions:
                raise Overloaded("too many streams", self.retry_after_ms)
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    @contextlib.contextmanager
    def running(self, session: StreamSession) -> Iterator[StreamSession]:
        """`session` is known to shutdown (`drain`, `stop`) for the life of the block;
        it is cancelled when the block ends, however it ends."""
        with self._lock:
            self._sessions.add(session)
        try:
            yield session
        finally:
            session.cancel()
            with self._lock:
                self._sessions.discard(session)

    def drain(self) -> None:
        """Shutdown begins: new streams are refused; realtime streams end cleanly (their
        input is closed: the speech made so far is sent, then the stream ends); offline
        streams go on until they finish or `stop` is called."""
        with self._lock:
            self._draining = True
            sessions = list(self._sessions)
        for session in sessions:
            if session.realtime:
                session.end()

    def stop(self) -> None:
        """After the grace period: every stream still open stops now."""
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.cancel()
