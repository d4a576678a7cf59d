"""One readable message for a failed gRPC call, wherever a call fails: the compositing
service calling inference, the client and tools calling the compositing service."""

from __future__ import annotations

import grpc


def rpc_error_message(exc: grpc.RpcError, service: str, address: str) -> str:
    """What went wrong with a call to `service` at `address`, for a person to read."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the {service} at {address}: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the {service} at {address} did not answer in time"
    return details or f"the {service} at {address} failed: {code}"
