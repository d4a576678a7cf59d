"""The checks of an Infer request, beside the engine they feed (engine.py:
`InferenceEngine.infer`): an `InferRequest` becomes an `EngineRequest` (arrays over the
request's bytes, the clip decoded to 16 kHz), or a `RequestError`
(lipsync.serving.request_checks, INVALID_ARGUMENT) or `UnknownModelError` (NOT_FOUND)
whose message tells the caller what is wrong."""

from __future__ import annotations

import numpy as np

from inference_service.engine import EngineRequest
from lipsync.avatars.package import AvatarCatalog, check_model_id
from lipsync.config import LimitsConfig
from lipsync.core.audio import decode_pcm
from lipsync.core.tensors import FACE_CROP_BYTES, VISUAL_BYTES
from lipsync.proto import inference_pb2 as ipb
from lipsync.rpc.messages import audio_encoding
from lipsync.serving.request_checks import (
    RequestError,
    check_batch_size,
    check_clip_frame_offset,
    check_feature_bytes,
    check_tensor_bytes,
)


def served_model(catalog: AvatarCatalog, model_id: str) -> str:
    """`model_id` if an avatar of that name is served; else UnknownModelError."""
    check_model_id(model_id)
    catalog.get(model_id)
    return model_id


def decode_clip(clip: ipb.AudioClip, limits: LimitsConfig) -> np.ndarray:
    try:
        enc = audio_encoding(clip.encoding)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    if clip.sample_offset and clip.sample_rate not in (0, 16000):
        raise RequestError("sample_offset needs 16 kHz audio")
    return decode_pcm(clip.pcm, enc, clip.sample_rate, max_seconds=limits.max_audio_seconds)


def decode_infer(
    req: ipb.InferRequest, limits: LimitsConfig, catalog: AvatarCatalog
) -> EngineRequest:
    """Check an Infer request and hold its inputs as arrays; the model is checked last
    (served by `catalog`)."""
    b = check_batch_size(req.batch_size, limits.max_batch_size)
    check_clip_frame_offset(req.clip_frame_offset)
    face_crops = visual = clip = features = None
    which = req.WhichOneof("visual")
    # each read of a protobuf bytes field copies it: read each once
    if which == "face_crops":
        data = req.face_crops
        check_tensor_bytes("face_crops", len(data), b, FACE_CROP_BYTES, "uint8 [B,320,320,3]")
        face_crops = np.frombuffer(data, np.uint8).reshape(b, 320, 320, 3)
    elif which == "visual_input":
        data = req.visual_input
        check_tensor_bytes("visual_input", len(data), b, VISUAL_BYTES, "float32 [B,6,320,320]")
        visual = np.frombuffer(data, np.float32).reshape(b, 6, 320, 320)
        if not np.isfinite(visual).all():
            raise RequestError("visual_input contains NaN or infinite values")
    else:
        raise RequestError("a visual input is required (face_crops or visual_input)")
    which = req.WhichOneof("audio")
    if which == "clip":
        clip = decode_clip(req.clip, limits)
    elif which == "audio_features":
        data = req.audio_features
        check_feature_bytes("audio_features", len(data), b)
        features = np.frombuffer(data, np.float32).reshape(-1, 32, 16, 16)
        if not np.all(np.isfinite(features)):
            raise RequestError("audio_features contains NaN or infinite values")
    else:
        raise RequestError("audio is required (clip or audio_features)")
    served_model(catalog, req.model_id)
    return EngineRequest(
        req.model_id,
        b,
        face_crops=face_crops,
        visual=visual,
        clip=clip,
        features=features,
        clip_frame_offset=req.clip_frame_offset,
        sample_offset=req.clip.sample_offset if clip is not None else 0,
    )
