"""What the gateway's sessions share about the compositing service they bridge to: which
of its refusals are the caller's to fix, how they read, and the key check before a
stream opens."""

from __future__ import annotations

import grpc

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.bearer import bearer_metadata
from lipsync.rpc.errors import rpc_error_message

# Refusals of the compositing service that are the caller's to fix (a WebSocket closes
# 1008, policy; an HTTP answer gets the status below).
POLICY_CODES = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


def rpc_message(exc: grpc.aio.AioRpcError, server: str) -> str:
    return rpc_error_message(exc, "compositing service", server)


async def list_models(
    stub: cpb_grpc.CompositingServiceStub, key: str | None, timeout: float
) -> cpb.ListModelsResponse:
    """ListModels with the caller's key (raises AioRpcError)."""
    return await stub.ListModels(
        cpb.ListModelsRequest(), metadata=bearer_metadata(key), timeout=timeout
    )


async def key_refusal(
    stub: cpb_grpc.CompositingServiceStub, key: str | None, timeout: float
) -> grpc.aio.AioRpcError | None:
    """The service's refusal of this key (or of its absence), checked with one cheap call
    before a stream opens: a refusal of the stream itself can race with the start message
    the gateway writes, and gRPC then reports an internal error instead of the refusal.
    None when the key is accepted; other failures are left to the stream to report."""
    try:
        await list_models(stub, key, timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in POLICY_CODES:
            return exc
    return None
