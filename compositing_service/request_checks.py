"""The checks of an InferBatchComposite request, beside the dataplane it feeds
(dataplane.py: `BatchDataplane.render`): a `CompositeBatchRequest` becomes a
`BatchRequest`, or a `RequestError` (lipsync.serving.request_checks) whose message tells
the caller what is wrong (answered as `success=false`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from compositing_service.dataplane import BatchRequest
from lipsync.avatars.package import check_model_id
from lipsync.config import LimitsConfig
from lipsync.core.audio import decode_pcm
from lipsync.core.tensors import VISUAL_BYTES
from lipsync.proto import compositing_pb2 as cpb
from lipsync.rpc.messages import audio_encoding
from lipsync.serving.request_checks import (
    RequestError,
    check_batch_size,
    check_clip_frame_offset,
    check_feature_bytes,
    check_tensor_bytes,
)


def batch_request(
    req: cpb.CompositeBatchRequest,
    limits: LimitsConfig,
    deadline: float | None = None,
    alive: Callable[[], bool] | None = None,
) -> BatchRequest:
    """Validate a request and hold its inputs; each bytes field is read once (every read
    of a protobuf bytes field copies it). Raw audio is decoded once here (16 kHz float32:
    each chunk sends only the span it reads). The caller's `deadline` (time.monotonic())
    and `alive` (is the caller still there) travel with it."""
    model_id = check_model_id(req.model_id)
    b = check_batch_size(req.batch_size, limits.max_batch_size)
    check_clip_frame_offset(req.clip_frame_offset)
    visual = req.visual_frames or None
    if visual is not None:
        check_tensor_bytes("visual_frames", len(visual), b, VISUAL_BYTES, "float32 [B,6,320,320]")
    pcm, features = req.raw_audio, req.audio_features
    samples = None
    if pcm and features:
        raise RequestError("send either raw_audio or audio_features, not both")
    if pcm:
        try:
            encoding = audio_encoding(req.audio_encoding)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        size = 2 if encoding == "s16le" else 4
        if len(pcm) % size:
            raise RequestError(f"raw_audio has {len(pcm)} bytes, not a multiple of {size}")
        samples = decode_pcm(pcm, encoding, req.sample_rate, max_seconds=limits.max_audio_seconds)
        del pcm
    elif features:
        check_feature_bytes("audio_features", len(features), b)
    else:
        raise RequestError("no audio: set raw_audio (PCM) or audio_features")
    if visual is not None:  # checked a slice at a time: no request-sized temporary
        v = np.frombuffer(visual, np.float32)
        step = 1 << 20
        if not all(np.isfinite(v[i : i + step]).all() for i in range(0, len(v), step)):
            raise RequestError("visual_frames contains NaN or infinite values")
    return BatchRequest(
        model_id,
        b,
        req.start_frame_idx,
        req.clip_frame_offset,
        visual,
        None,
        features,
        samples=samples,
        deadline=deadline,
        alive=alive,
    )
