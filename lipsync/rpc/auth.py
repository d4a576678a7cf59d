"""API keys on the client port: a gRPC server interceptor that authenticates callers by
`authorization: Bearer <key>` metadata, checks the scope a method needs and applies each
key's limits (concurrent streams, frames per second). docs/SECURITY.md describes it.

The keys file (`auth.api_keys_file`) is a YAML list; only the SHA-256 of a key is stored:

    - name: web-frontend
      key_sha256: 9f86d0...          # hex SHA-256 of the key (lipsync-admin new-key)
      scopes: [client]               # client | admin (admin includes client)
      max_streams: 4                 # concurrent StreamComposite calls; 0: no limit
      max_frames_per_second: 100     # token bucket on frames; 0: no limit

It is re-read when its mtime changes (checked at most once a second); a file that no
longer loads keeps the previous keys, with an error in the log. Keys never reach the
log: refusals name the key's `name`, or say that no or an unknown key was sent.

Frame rate: one token bucket per key (rate `max_frames_per_second`, holding one second's
frames, full at start). InferBatchComposite is admitted while the bucket is not in debt
and takes `batch_size` tokens (so any batch size fits, and a large one puts the key in
debt for the time it is worth; a request answered `success=false` gets its tokens back).
StreamComposite is admitted while the bucket is not in debt, and then each frame it
sends takes a token: a stream faster than the key's rate is paced to it (its frames wait)
rather than ended. Refusals are RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

log = logging.getLogger(__name__)

SCOPES = ("client", "admin")
KEY_PREFIX = "lsk_"
BURST_S = 1.0  # a key's bucket holds this many seconds of frames
RELOAD_CHECK_S = 1.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"name", "key_sha256", "scopes", "max_streams", "max_frames_per_second"}


class KeysFileError(ValueError):
    """The keys file is missing or malformed; the message says where."""


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    name: str
    key_sha256: str
    scopes: frozenset[str]
    max_streams: int = 0
    max_frames_per_second: float = 0.0

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def entry(self) -> dict[str, Any]:
        """The keys file entry of this key."""
        return {
            "name": self.name,
            "key_sha256": self.key_sha256,
            "scopes": sorted(self.scopes, key=SCOPES.index),
            "max_streams": self.max_streams,
            "max_frames_per_second": self.max_frames_per_second,
        }


def parse_keys(data: Any, where: str = "keys file") -> dict[str, ApiKey]:
    """{key_sha256: ApiKey} of a loaded keys file (a list of entries)."""
    if data is None:
        data = []
    if not isinstance(data, list):
        raise KeysFileError(f"{where}: expected a list of keys")
    out: dict[str, ApiKey] = {}
    names: set[str] = set()
    for i, e in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise KeysFileError(f"{at}: expected a mapping")
        unknown = set(e) - _FIELDS
        if unknown:
            raise KeysFileError(f"{at}: unknown field(s) {sorted(unknown)}")
        name, digest = e.get("name"), e.get("key_sha256")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{at}: 'name' must be a non-empty string")
        if name in names:
            raise KeysFileError(f"{at}: duplicate name {name!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            raise KeysFileError(f"{at} ({name}): 'key_sha256' must be 64 hex digits")
        scopes = e.get("scopes", ["client"])
        if isinstance(scopes, str):
            scopes = [scopes]
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise KeysFileError(f"{at} ({name}): 'scopes' must be a list of {SCOPES}")
        max_streams = e.get("max_streams", 0)
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 0:
            raise KeysFileError(f"{at} ({name}): 'max_streams' must be an integer >= 0")
        fps = e.get("max_frames_per_second", 0)
        if isinstance(fps, bool) or not isinstance(fps, int | float) or fps < 0:
            raise KeysFileError(f"{at} ({name}): 'max_frames_per_second' must be >= 0")
        names.add(name)
        out[digest.lower()] = ApiKey(name, digest.lower(), frozenset(scopes), max_streams, fps)
    return out


def load_keys(path: str | Path) -> dict[str, ApiKey]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{path}: not YAML: {exc}") from None
    return parse_keys(data, str(path))


class TokenBucket:
    """Frames per second with debt: `admit` says whether the bucket is not in debt,
    `take` removes tokens (possibly into debt) and returns how long the caller would
    wait for them to be paid back."""

    def __init__(self, rate: float, burst_s: float = BURST_S, clock=time.monotonic):
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate * burst_s)
        self.clock = clock
        self.tokens = self.capacity
        self.t = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def admit(self) -> float:
        """0 when a request may start now, else the seconds until it may."""
        with self.lock:
            self._refill()
            return 0.0 if self.tokens > 0 else (1 - self.tokens) / self.rate

    def take(self, n: float) -> float:
        with self.lock:
            self._refill()
            self.tokens -= n
            return max(0.0, -self.tokens / self.rate)


@dataclass
class _Usage:
    streams: int = 0
    bucket: TokenBucket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeyStore:
    """The keys of a file, re-read when it changes, and each key's usage (kept across
    reloads by the key's name)."""

    def __init__(self, path: str | Path, clock=time.monotonic):
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._keys = load_keys(self.path)
        self._checked = clock()
        self._usage: dict[str, _Usage] = {}
        log.info("API keys: %d key(s) from %s", len(self._keys), self.path)

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1)
        return (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self, force: bool = False) -> None:
        now = self.clock()
        with self._lock:
            if not force and now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                keys = load_keys(self.path)
            except KeysFileError as exc:
                log.error("API keys file changed but does not load (keeping the old keys): %s", exc)
                return
            self._keys = keys
        log.info("API keys reloaded: %d key(s) from %s", len(keys), self.path)

    def lookup(self, presented: str) -> ApiKey | None:
        self.reload_if_changed()
        return self._keys.get(hash_key(presented))

    def usage(self, key: ApiKey) -> _Usage:
        with self._lock:
            u = self._usage.get(key.name)
            if u is None:
                u = self._usage[key.name] = _Usage()
            rate = key.max_frames_per_second
            if rate and (u.bucket is None or u.bucket.rate != rate):
                u.bucket = TokenBucket(rate, clock=self.clock)
            elif not rate:
                u.bucket = None
            return u


def bearer_key(metadata: Any) -> str | None:
    """The key of an `authorization: Bearer <key>` metadata entry, if any."""
    for k, v in metadata or ():
        if k == "authorization" and isinstance(v, str):
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def bearer_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `api_key` (none without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MethodPolicy:
    """What one method requires: a scope (None: open to anyone), how many frames a
    request asks for (unary calls), whether it is a stream that counts against
    `max_streams`, and what an unauthenticated caller's response loses (`redact`)."""

    scope: str | None
    frames: Callable[[Any], int] | None = None
    refund: Callable[[Any], bool] | None = None  # True: the response gets its tokens back
    stream: bool = False
    redact: Callable[[Any], Any] | None = None


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Authenticates and limits the calls of the methods in `policies`; methods not
    there need the `admin` scope unless their service is in `open_services`."""

    def __init__(
        self,
        keys: KeyStore,
        policies: Mapping[str, MethodPolicy],
        open_services: tuple[str, ...] = ("/grpc.health.v1.Health/",),
    ):
        self.keys = keys
        self.policies = dict(policies)
        self.open_services = open_services

    # -- decisions ----------------------------------------------------------------------
    def _authenticate(self, metadata: Any) -> ApiKey | None:
        presented = bearer_key(metadata)
        return self.keys.lookup(presented) if presented else None

    def _authorize(self, method: str, policy: MethodPolicy, key: ApiKey | None) -> None:
        if key is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "an API key is required: send the metadata 'authorization: Bearer <key>'",
            )
        if not key.allows(policy.scope or "admin"):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"API key {key.name!r} lacks the {policy.scope!r} scope {method} needs",
            )

    def _admit_frames(self, key: ApiKey, usage: _Usage) -> None:
        if usage.bucket is not None:
            wait = usage.bucket.admit()
            if wait > 0:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"API key {key.name!r} is over its limit of {key.max_frames_per_second:g} "
                    f"frames/s; retry in {wait:.1f} s",
                )

    def _refuse(self, method: str, key: ApiKey | None, exc: Refused, context) -> None:
        log.info(
            "refused %s for %s: %s",
            method,
            f"key {key.name!r}" if key else "a caller without a valid key",
            exc.code.name,
        )
        context.abort(exc.code, str(exc))

    # -- the interceptor ----------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_services):
            return handler
        policy = self.policies.get(method, MethodPolicy("admin"))
        key = self._authenticate(handler_call_details.invocation_metadata)
        if policy.scope is None:
            if key is None and policy.redact is not None:
                return _wrap(handler, unary=lambda b: lambda r, c: policy.redact(b(r, c)))
            return handler
        if handler.request_streaming or handler.response_streaming:
            if not (handler.request_streaming and handler.response_streaming):
                return _wrap_any(handler, lambda ctx: self._check(method, policy, key, ctx))
            return _wrap(handler, stream=lambda b: self._stream(method, policy, key, b))
        return _wrap(handler, unary=lambda b: self._unary(method, policy, key, b))

    def _check(self, method: str, policy: MethodPolicy, key: ApiKey | None, context) -> None:
        try:
            self._authorize(method, policy, key)
        except Refused as exc:
            self._refuse(method, key, exc, context)

    def _unary(self, method: str, policy: MethodPolicy, key: ApiKey | None, behavior):
        def call(request, context):
            usage = None
            n = 0
            try:
                self._authorize(method, policy, key)
                assert key is not None
                if policy.frames is not None:
                    usage = self.keys.usage(key)
                    self._admit_frames(key, usage)
                    n = max(0, int(policy.frames(request)))
                    if usage.bucket is not None:
                        usage.bucket.take(n)
            except Refused as exc:
                self._refuse(method, key, exc, context)
            response = behavior(request, context)
            bucket = usage.bucket if usage is not None else None
            if bucket is not None and policy.refund is not None and policy.refund(response):
                bucket.take(-n)
            return response

        return call

    def _stream(self, method: str, policy: MethodPolicy, key: ApiKey | None, behavior):
        def call(request_iterator, context):
            try:
                self._authorize(method, policy, key)
                assert key is not None
                usage = self.keys.usage(key)
                self._admit_frames(key, usage)
                if policy.stream:
                    with usage.lock:
                        if key.max_streams and usage.streams >= key.max_streams:
                            raise Refused(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"API key {key.name!r} has its {key.max_streams} stream(s) "
                                "open already",
                            )
                        usage.streams += 1
            except Refused as exc:
                self._refuse(method, key, exc, context)
            release = _Once(usage, policy.stream)
            context.add_callback(release)  # a cancelled call may never finish the iterator
            try:
                yield from _paced(behavior(request_iterator, context), usage)
            finally:
                release()

        return call


def _paced(frames: Iterator[Any], usage: _Usage) -> Iterator[Any]:
    for frame in frames:
        bucket = usage.bucket
        if bucket is not None:
            wait = bucket.take(1)
            if wait > 0:
                time.sleep(min(wait, 5.0))
        yield frame


class _Once:
    """Releases a stream's slot once (from the iterator's end or the call's callback)."""

    def __init__(self, usage: _Usage, counted: bool):
        self.usage, self.counted = usage, counted
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            if not self.counted:
                return
            self.counted = False
        with self.usage.lock:
            self.usage.streams -= 1


def _wrap(handler, unary=None, stream=None):
    """`handler` with its behavior replaced by `unary(behavior)` (unary-unary) or
    `stream(behavior)` (stream-stream)."""
    if not handler.request_streaming and not handler.response_streaming and unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.request_streaming and handler.response_streaming and stream:
        return grpc.stream_stream_rpc_method_handler(
            stream(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_any(handler, check):
    """A unary-stream or stream-unary `handler` that runs `check(context)` first."""
    if handler.response_streaming:
        behavior = handler.unary_stream

        def unary_stream(request, context):
            check(context)
            yield from behavior(request, context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    behavior = handler.stream_unary

    def stream_unary(request_iterator, context):
        check(context)
        return behavior(request_iterator, context)

    return grpc.stream_unary_rpc_method_handler(
        stream_unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def interceptors_for(
    api_keys_file: str | None, policies: Mapping[str, MethodPolicy]
) -> list[grpc.ServerInterceptor]:
    """[ApiKeyInterceptor] when a keys file is configured, else [] (an open port)."""
    if not api_keys_file:
        return []
    return [ApiKeyInterceptor(KeyStore(api_keys_file), policies)]
