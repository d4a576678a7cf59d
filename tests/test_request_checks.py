"""The request checks beside each service's dataplane, called as the servicers call them:
a protocol message in, the dataplane's request or an error that says what is wrong out."""

from __future__ import annotations

import numpy as np
import pytest

from compositing_service.request_checks import batch_request
from inference_service.request_checks import decode_infer
from lipsync.avatars.package import AvatarCatalog, UnknownModelError
from lipsync.config import LimitsConfig
from lipsync.core.tensors import BLOCK_BYTES, FACE_CROP_BYTES, VISUAL_BYTES
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb
from lipsync.serving.request_checks import RequestError
from tests.avatar_factory import speech_like

LIMITS = LimitsConfig(max_batch_size=8, max_audio_seconds=5.0)


def test_a_batch_request_holds_its_audio_decoded_and_the_callers_deadline():
    pcm = (speech_like(0.5, seed=1) * 32767).astype("<i2").tobytes()
    alive = lambda: True  # noqa: E731
    req = batch_request(
        cpb.CompositeBatchRequest(
            model_id="alice",
            raw_audio=pcm,
            audio_encoding=cpb.PCM_S16LE,
            sample_rate=8000,
            batch_size=3,
            start_frame_idx=4,
            clip_frame_offset=2,
        ),
        LIMITS,
        deadline=123.0,
        alive=alive,
    )
    assert (req.model_id, req.batch_size, req.start_frame_idx, req.clip_frame_offset) == (
        "alice",
        3,
        4,
        2,
    )
    assert req.samples is not None and req.samples.dtype == np.float32
    assert len(req.samples) == 2 * (len(pcm) // 2)  # s16 at 8 kHz -> 16 kHz: twice as many
    assert req.deadline == 123.0 and req.alive is alive
    assert req.visual is None and req.features == b""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 9, "raw_audio": b"\0\0"}, "batch_size must be between 1 and 8"),
        ({"batch_size": 2}, "no audio"),
        ({"batch_size": 2, "raw_audio": b"\0\0", "audio_features": b"\0" * 4}, "not both"),
        ({"batch_size": 2, "raw_audio": b"\0\0\0"}, "3 bytes, not a multiple of 4"),
        ({"batch_size": 2, "audio_features": b"\0" * 12}, "audio_features has 12 bytes"),
        (
            {
                "batch_size": 1,
                "audio_features": bytes(BLOCK_BYTES),
                "visual_frames": np.full(VISUAL_BYTES // 4, np.nan, np.float32).tobytes(),
            },
            "NaN",
        ),
    ],
)
def test_a_bad_batch_request_says_what_is_wrong(fields, message):  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError, match=message):
        batch_request(cpb.CompositeBatchRequest(model_id="alice", **fields), LIMITS)


def test_an_infer_request_becomes_arrays_over_its_bytes(avatars_root):  # type: ignore[no-untyped-def]
    catalog = AvatarCatalog(avatars_root)
    crops = np.arange(2 * FACE_CROP_BYTES, dtype=np.uint64).astype(np.uint8).tobytes()
    pcm = speech_like(0.3, seed=2).astype("<f4").tobytes()
    d = decode_infer(
        ipb.InferRequest(
            model_id="alice",
            batch_size=2,
            face_crops=crops,
            clip=ipb.AudioClip(pcm=pcm, sample_offset=640),
            clip_frame_offset=5,
        ),
        LIMITS,
        catalog,
    )
    assert d.face_crops is not None and d.face_crops.shape == (2, 320, 320, 3)
    assert d.face_crops.tobytes() == crops
    assert d.clip is not None and len(d.clip) == len(pcm) // 4
    assert (d.model_id, d.batch_size, d.clip_frame_offset, d.sample_offset) == ("alice", 2, 5, 640)
    assert d.visual is None and d.features is None


def test_the_model_is_checked_after_the_request(avatars_root):  # type: ignore[no-untyped-def]
    catalog = AvatarCatalog(avatars_root)
    crops = bytes(FACE_CROP_BYTES)
    clip = ipb.AudioClip(pcm=bytes(4 * 16000))  # 1 s of float32 silence
    with pytest.raises(RequestError, match="batch_size"):
        decode_infer(ipb.InferRequest(model_id="nobody", batch_size=0), LIMITS, catalog)
    with pytest.raises(RequestError, match="sample_offset needs 16 kHz"):
        decode_infer(
            ipb.InferRequest(
                model_id="nobody",
                batch_size=1,
                face_crops=crops,
                clip=ipb.AudioClip(pcm=bytes(64), sample_rate=8000, sample_offset=8),
            ),
            LIMITS,
            catalog,
        )
    with pytest.raises(UnknownModelError):
        decode_infer(
            ipb.InferRequest(model_id="nobody", batch_size=1, face_crops=crops, clip=clip),
            LIMITS,
            catalog,
        )
