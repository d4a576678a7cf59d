"""The compositing dataplane of InferBatchComposite: a batch of frames is cut into chunks
of `compositing.inference_chunk` frames; each chunk's face crops are cut and sent to the
inference service while the chunk before it is pasted and JPEG-encoded."""

from __future__ import annotations

import contextvars
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from compositing_service.compositor import Compositor
from compositing_service.frames import AvatarFrames, FrameStore
from compositing_service.inference_client import (
    ClipAudio,
    DeadlineError,
    InferCall,
    InferenceClient,
    Mouths,
)
from lipsync.core.audio import SAMPLE_RATE
from lipsync.core.lookahead import clip_span
from lipsync.core.tensors import BLOCK_BYTES, VISUAL_BYTES


class CallerGone(Exception):
    """The caller cancelled or its deadline passed: the rest of its work is dropped."""


@dataclass(frozen=True)
class BatchRequest:
    """A validated InferBatchComposite request: output frame k is clip frame
    `clip_frame_offset + k`, drawn on background frame pingpong(`start_frame_idx + k`).
    Visual input: the avatar's own crops, or `visual` (float32 [B,6,320,320] bytes).
    Audio: `samples` (the clip decoded once to 16 kHz float32; each chunk sends only the
    span its frames read, `lipsync.core.lookahead.clip_span`), `clip` (PCM sent as is with
    every chunk), or `features` (float32 blocks).
    `deadline` (time.monotonic()) bounds every inference call, retries included; `alive`
    says whether the caller is still there (checked between chunks)."""

    model_id: str
    batch_size: int
    start_frame_idx: int = 0
    clip_frame_offset: int = 0
    visual: bytes | None = None
    clip: ClipAudio | None = None
    features: bytes = b""
    samples: np.ndarray | None = None
    deadline: float | None = None
    alive: Callable[[], bool] | None = None


@dataclass
class BatchResult:
    frames: list[bytes]
    background_indices: list[int]
    stages_ms: dict[str, float] = field(default_factory=dict)
    gpu_id: int = -1


@dataclass
class _Chunk:
    crops: list[np.ndarray] | None  # the 328x328 crops, kept for the paste
    mouths: Mouths
    crop_ms: float
    inference_ms: float


class BatchDataplane:
    def __init__(
        self,
        frames: FrameStore,
        inference: InferenceClient,
        compositor: Compositor,
        chunk_frames: int,
        workers: int,
    ):
        self.frames = frames
        self.inference = inference
        self.compositor = compositor
        self.chunk_frames = max(1, chunk_frames)
        # Inference calls of chunks (they wait on the network, not the CPU).
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer-chunk")

    def _infer_chunk(
        self, req: BatchRequest, avatar: AvatarFrames, indices: list[int], k0: int, k1: int
    ) -> _Chunk:
        t = time.perf_counter()
        crops = face_crops = None
        if req.visual is None:
            batch = self.compositor.crops(avatar, indices[k0:k1])
            crops, face_crops = batch.crops, batch.inner
        features = req.features
        if len(features) > BLOCK_BYTES:  # per-frame blocks: this chunk's
            features = features[k0 * BLOCK_BYTES : k1 * BLOCK_BYTES]
        clip = req.clip
        if req.samples is not None:  # only the span of the clip these frames read
            first = req.clip_frame_offset + k0
            start, stop = clip_span(len(req.samples), first, first + (k1 - k0) - 1)
            clip = ClipAudio(req.samples[start:stop].tobytes(), SAMPLE_RATE, "f32le", start)
        self._check_caller(req)
        t_inf = time.perf_counter()
        mouths = self.inference.infer(
            InferCall(
                req.model_id,
                k1 - k0,
                face_crops=face_crops,
                visual_input=None
                if req.visual is None
                else req.visual[k0 * VISUAL_BYTES : k1 * VISUAL_BYTES],
                clip=clip,
                audio_features=features or None,
                clip_frame_offset=req.clip_frame_offset + k0,
                deadline=req.deadline,
            )
        )
        done = time.perf_counter()
        return _Chunk(crops, mouths, (t_inf - t) * 1e3, (done - t_inf) * 1e3)

    def _submit(self, *args):  # type: ignore[no-untyped-def]
        """`_infer_chunk` in the pool, in a copy of this call's context (its request id
        and trace span travel to the inference call: lipsync.serving.observability)."""
        return self._pool.submit(contextvars.copy_context().run, self._infer_chunk, *args)

    @staticmethod
    def _check_caller(req: BatchRequest) -> None:
        """Raise CallerGone if the caller left or its deadline passed (a stage boundary)."""
        if req.alive is not None and not req.alive():
            raise CallerGone("the caller cancelled")
        if req.deadline is not None and time.monotonic() >= req.deadline:
            raise DeadlineError("the caller's deadline passed")

    def render(self, req: BatchRequest) -> BatchResult:
        """Every frame of the batch as JPEG, in order; at most two chunks in flight."""
        stages: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        avatar = self.frames.get(req.model_id)
        stages["background_cache"] = (time.perf_counter() - t0) * 1e3
        indices = self.compositor.background_indices(avatar, req.start_frame_idx, req.batch_size)
        step = self.chunk_frames
        bounds = [(k, min(k + step, len(indices))) for k in range(0, len(indices), step)]
        pending = [self._submit(req, avatar, indices, *b) for b in bounds[:2]]
        frames: list[bytes] = []
        gpu_id = -1
        try:
            for n, (k0, k1) in enumerate(bounds):
                chunk = pending[n].result()
                self._check_caller(req)
                if n + 2 < len(bounds):
                    pending.append(self._submit(req, avatar, indices, *bounds[n + 2]))
                remote = chunk.mouths.stage_times_ms
                stages["crop"] += chunk.crop_ms
                stages["inference"] += chunk.inference_ms
                for k, v in remote.items():
                    stages[f"inference.{k}"] += v
                served = sum(v for k, v in remote.items() if k != "model_load")
                stages["transfer"] += max(0.0, chunk.inference_ms - served)
                gpu_id = chunk.mouths.gpu_id
                t = time.perf_counter()
                frames += self.compositor.composite(
                    avatar, indices[k0:k1], chunk.mouths.pixels, chunk.crops
                )
                stages["paste_jpeg"] += (time.perf_counter() - t) * 1e3
        finally:
            for f in pending:
                f.cancel()
        return BatchResult(frames, indices, dict(stages), gpu_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
