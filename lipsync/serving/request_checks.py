"""Request checks both services make at their boundaries, in one style: a `RequestError`
whose message tells the caller what is wrong (INVALID_ARGUMENT, or `success=false`)."""

from __future__ import annotations

from lipsync.core.tensors import BLOCK_BYTES


class RequestError(ValueError):
    """The request is malformed; the message says how."""


def check_batch_size(batch_size: int, limit: int) -> int:
    if not 1 <= batch_size <= limit:
        raise RequestError(f"batch_size must be between 1 and {limit}, got {batch_size}")
    return batch_size


def check_clip_frame_offset(offset: int) -> int:
    if offset < 0:
        raise RequestError("clip_frame_offset must be >= 0")
    return offset


def check_tensor_bytes(name: str, size: int, batch: int, per_frame: int, layout: str) -> None:
    """`size` bytes must be `batch` frames of `per_frame` bytes (`layout` names it)."""
    if size != batch * per_frame:
        raise RequestError(
            f"{name} has {size} bytes; batch_size {batch} needs {batch * per_frame} ({layout})"
        )


def check_feature_bytes(name: str, size: int, batch: int) -> None:
    """Audio features: float32 [B, 32, 16, 16], or one [32, 16, 16] block for every frame."""
    if size not in (BLOCK_BYTES, batch * BLOCK_BYTES):
        raise RequestError(
            f"{name} has {size} bytes; expected {batch * BLOCK_BYTES} (float32 "
            f"[{batch},32,16,16]) or {BLOCK_BYTES} (one [32,16,16] block for every frame)"
        )
