"""The gRPC status a caller gets for the errors both services raise the same way, in one
place; each servicer adds only the errors of its own (docs/ARCHITECTURE.md, "Errors")."""

from __future__ import annotations

import grpc

from lipsync.avatars.package import UnknownModelError
from lipsync.core.audio import AudioError
from lipsync.serving.admission import Overloaded
from lipsync.serving.request_checks import RequestError
from lipsync.serving.store import CapacityError


def domain_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a shared domain error; None for any other exception."""
    if isinstance(exc, RequestError | AudioError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UnknownModelError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CapacityError | Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"
    return None


def abort(
    context: grpc.ServicerContext, exc: BaseException, code: grpc.StatusCode, message: str
) -> None:
    """End the call with `code`; a load-shedding refusal carries its retry hint."""
    if isinstance(exc, Overloaded):
        context.set_trailing_metadata(exc.trailing_metadata())
    context.abort(code, message)
