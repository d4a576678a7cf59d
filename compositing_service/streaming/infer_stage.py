"""Inference: a planned batch's clip tail and face crops to the inference service, the
mouths back; with each frame's `speech` flag and (with `return_audio`) its 40 ms of
audio as s16le."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from compositing_service.compositor import Compositor
from compositing_service.frames import AvatarFrames
from compositing_service.inference_client import (
    ClipAudio,
    DeadlineError,
    InferCall,
    InferenceClient,
)
from compositing_service.streaming.ingest import SPEECH_SPAN, AudioTail
from compositing_service.streaming.planner import Batch
from lipsync.core.audio import SAMPLE_RATE, SAMPLES_PER_FRAME, to_int16
from lipsync.core.timeline import background_indices

SPEECH_RMS = 10 ** (-50 / 20)  # -50 dBFS: a frame whose +-100 ms is louder is speech

# Failures of an inference call that a realtime stream rides out (the batch's speech is
# dropped, the avatar idles) instead of ending: the service is down, restarting or full.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def transient(exc: BaseException) -> bool:
    """Whether `exc` is an inference outage rather than a bad stream."""
    if isinstance(exc, DeadlineError):
        return True
    return isinstance(exc, grpc.RpcError) and getattr(exc, "code", lambda: None)() in (
        TRANSIENT_CODES
    )


@dataclass
class InferredBatch:
    batch: Batch
    backgrounds: list[int]  # background frame of each frame
    crops: list[np.ndarray]  # the face crops, for the paste
    mouths: np.ndarray  # uint8 [B, 320, 320, 3]
    speech: list[bool]
    audio: list[bytes]  # s16le, 1280 bytes each with return_audio, else b""

    @property
    def epoch(self) -> int:
        return self.batch.epoch


def speech_flags(tail: AudioTail, first: int, stop: int) -> list[bool]:
    """Whether the audio around each frame (+-100 ms; zeros before the clip's start,
    nothing past what has arrived) is louder than -50 dBFS RMS."""
    flags = []
    for i in range(first, stop):
        s = tail.get(i * SAMPLES_PER_FRAME - SPEECH_SPAN, i * SAMPLES_PER_FRAME + SPEECH_SPAN)
        flags.append(bool(len(s)) and float(np.sqrt(np.mean(s * s))) > SPEECH_RMS)
    return flags


def frame_audio(tail: AudioTail, first: int, stop: int) -> list[bytes]:
    """Each frame's own 640 samples as s16le (`lipsync.core.audio.to_int16`), zero-padded
    past the clip's end."""
    out = []
    for i in range(first, stop):
        a = tail.get(i * SAMPLES_PER_FRAME, (i + 1) * SAMPLES_PER_FRAME)
        a = np.pad(a, (0, SAMPLES_PER_FRAME - len(a)))
        out.append(to_int16(a).astype("<i2", copy=False).tobytes())
    return out


class InferStage:
    def __init__(
        self,
        model_id: str,
        avatar: AvatarFrames,
        inference: InferenceClient,
        compositor: Compositor,
        *,
        start_frame_idx: int = 0,
        return_audio: bool = False,
        call_budget_s: Callable[[], float] | None = None,
    ):
        self.model_id = model_id
        self.avatar = avatar
        self.inference = inference
        self.compositor = compositor
        self.start_frame_idx = start_frame_idx
        self.return_audio = return_audio
        # realtime: how long an inference call (retries included) may take before it gives
        # up, asked per call, so an outage costs a clip's speech, not the video (None: the
        # client's own timeout and retry window, offline)
        self.call_budget_s = call_budget_s
        self._epoch = 0  # batches planned before the last interrupt are dropped

    def interrupt(self, epoch: int) -> None:
        self._epoch = epoch

    def stale(self, batch: Batch) -> bool:
        return batch.epoch < self._epoch

    def run(self, batch: Batch) -> InferredBatch | None:
        """The batch's mouths; None if an interrupt dropped it (before or during)."""
        if self.stale(batch):
            return None
        backgrounds = background_indices(
            self.start_frame_idx + batch.slot, batch.size, self.avatar.count
        )
        crops = self.compositor.crops(self.avatar, backgrounds)
        tail = batch.tail
        budget = None if self.call_budget_s is None else self.call_budget_s()
        mouths = self.inference.infer(
            InferCall(
                self.model_id,
                batch.size,
                face_crops=crops.inner,
                clip=ClipAudio(
                    pcm=tail.samples.astype(np.float32, copy=False).tobytes(),
                    sample_rate=SAMPLE_RATE,
                    encoding="f32le",
                    sample_offset=tail.offset,
                ),
                clip_frame_offset=batch.first,
                deadline=None if budget is None else time.monotonic() + budget,
            )
        )
        if self.stale(batch):
            return None
        return InferredBatch(
            batch,
            backgrounds,
            crops.crops,
            mouths.pixels,
            speech_flags(tail, batch.first, batch.stop),
            frame_audio(tail, batch.first, batch.stop) if self.return_audio else [b""] * batch.size,
        )
