"""The API-key check on the client port: a gRPC server interceptor that authenticates
callers by `authorization: Bearer <key>` metadata, checks the scope a method needs and
applies each key's limits (concurrent streams, frames per second). The keys and their
limits are lipsync/serving/api_keys.py; docs/SECURITY.md describes both.

Frame rate: one token bucket per key (rate `max_frames_per_second`, holding one second's
frames, full at start). InferBatchComposite is admitted while the bucket is not in debt
and takes `batch_size` tokens (so any batch size fits, and a large one puts the key in
debt for the time it is worth; a request answered `success=false` gets its tokens back).
StreamComposite is admitted while the bucket is not in debt, and then each frame it
sends takes a token: a stream faster than the key's rate is paced to it (its frames wait)
rather than ended. Refusals are RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from lipsync.serving.api_keys import ApiKey, KeyStore, KeyUsage, bearer_key

log = logging.getLogger(__name__)


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

    def _admit_frames(self, key: ApiKey, usage: KeyUsage) -> None:
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


def _paced(frames: Iterator[Any], usage: KeyUsage) -> Iterator[Any]:
    for frame in frames:
        bucket = usage.bucket
        if bucket is not None:
            wait = bucket.take(1)
            if wait > 0:
                time.sleep(min(wait, 5.0))
        yield frame


class _Once:
    """Releases a stream's slot once (from the iterator's end or the call's callback)."""

    def __init__(self, usage: KeyUsage, counted: bool):
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
