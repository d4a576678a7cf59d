"""Logging of the services: `text` lines or `json`, one object per line, and the ids of
the call a line belongs to.

Each JSON line has `time` (UTC, ISO 8601), `level`, `service`, `logger`, `event` (the
message) and, where they apply, `request_id`, `stream_id`, `model_id`, `rpc`; an access
line (lipsync.serving.observability) adds `code` and `duration_ms`; a line logged with an exception
adds `exc`. Ids come from the call being served (`call_ids`, set by the server
interceptor) or from a record's `extra`. Nothing logs audio, keys or payloads: access lines
carry the method, status, duration, peer and ids only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The ids of the call this thread serves (copied into worker threads with
# contextvars.copy_context where the work hops threads).
_IDS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("lipsync_log_ids")
ID_FIELDS = ("request_id", "stream_id", "model_id", "rpc")
_EXTRA_FIELDS = (*ID_FIELDS, "code", "duration_ms", "peer", "frames")

_HANDLER_MARK = "_lipsync_handler"


def current_ids() -> dict[str, str]:
    return _IDS.get({})


@contextmanager
def call_ids(**ids: str) -> Iterator[None]:
    """Tag the log lines of the enclosed code with `ids` (request_id=..., model_id=...)."""
    token = _IDS.set({**current_ids(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _IDS.reset(token)


def add_ids(**ids: str) -> None:
    """Add ids to the current call's (e.g. the model id once the request is read)."""
    _IDS.set({**current_ids(), **{k: v for k, v in ids.items() if v}})


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(current_ids())
        for key in _EXTRA_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the call's ids appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = {**current_ids()}
        for key in ID_FIELDS:
            if record.__dict__.get(key) is not None:
                ids[key] = record.__dict__[key]
        if ids:
            line += " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        return line


def setup_logging(level: str, fmt: str = "text", service: str = "lipsync") -> None:
    """Configure the root logger: one stderr handler in `fmt` (text | json). Calling it
    again replaces the handler it installed (not others)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)


class EarlyLogs(logging.Handler):
    """Holds the records logged before `setup_logging` (while the config is read: e.g.
    its warnings about environment variables) and replays them through the handlers set
    up after, so a JSON log has no plain line:

        with EarlyLogs() as early:
            cfg = load_config(...)
        setup_logging(...)
        early.replay()

    If reading the config fails, what it logged is replayed at once (plain text)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> EarlyLogs:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        logging.getLogger().removeHandler(self)
        if exc_type is not None:
            self.replay()

    def replay(self) -> None:
        root = logging.getLogger()
        handlers = [h for h in root.handlers if h is not self] or [logging.lastResort]
        for record in self.records:
            if record.levelno >= root.getEffectiveLevel():
                for handler in handlers:
                    if handler is not None and record.levelno >= handler.level:
                        handler.handle(record)
        self.records.clear()
