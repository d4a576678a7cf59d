"""The inference pipeline: audio clip -> mel -> windows -> encoder -> per-frame audio
blocks, face crops -> visual input, then the UNet over the batch.

Transport-free: the gRPC servicer (servicer.py) decodes each request into the
`EngineRequest` this module takes and encodes what it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference_service.batching import BatchRun, Expired, caller_scope
from inference_service.memory import LoadMeter
from inference_service.networks import (
    AudioEncoder,
    AvatarNetworks,
    BatchPolicy,
    CpuPrecision,
    load_networks,
)
from inference_service.registry import ModelRegistry
from inference_service.sessions import SessionOptions
from lipsync.avatars.package import AvatarCatalog
from lipsync.avatars.quantize.check import QualityBounds
from lipsync.config import Config
from lipsync.core import audio, lookahead, mel, windows
from lipsync.core.visual import visual_input
from lipsync.serving.request_checks import RequestError

log = logging.getLogger(__name__)


@dataclass
class Timings:
    ms: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - t0) * 1000.0
        return now


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class EngineRequest:
    """One batch's inputs, decoded (the servicer builds it from an InferRequest).

    Visual: `face_crops` uint8 [B, 320, 320, 3] or `visual` float32 [B, 6, 320, 320].
    Audio: `clip` (float32 16 kHz samples from `sample_offset` on; frame k is clip frame
    `clip_frame_offset + k`) or `features` float32 [B, 32, 16, 16] / [1, 32, 16, 16].
    """

    model_id: str
    batch_size: int
    face_crops: np.ndarray | None = None
    visual: np.ndarray | None = None
    clip: np.ndarray | None = None
    features: np.ndarray | None = None
    clip_frame_offset: int = 0
    sample_offset: int = 0


@dataclass
class InferResult:
    mouths: np.ndarray  # float32 [B, 3, 320, 320] in [0, 1]
    timings: Timings
    provider: str


class InferenceEngine:
    def __init__(self, cfg: Config, catalog: AvatarCatalog | None = None):
        self.cfg = cfg
        icfg = cfg.inference
        # The mel basis comes from librosa, whose import takes ~0.7 s: pay it at start,
        # not in the first request (it made a realtime stream's first call miss its budget).
        mel.melspectrogram(np.zeros(audio.MIN_SAMPLES, np.float32))
        self.catalog = catalog or AvatarCatalog(cfg.avatars_path)
        self.session_opts = SessionOptions.from_config(icfg)
        b = icfg.batching
        self.batch_policy = BatchPolicy(
            b.enabled, b.max_batch, b.max_wait_ms / 1000.0, b.cpu_max_batch
        )
        self._shared_encoder: AudioEncoder | None = None
        if icfg.shared_audio_encoder:
            self._shared_encoder = AudioEncoder(
                Path(icfg.shared_audio_encoder), self.session_opts, self.batch_policy
            )
        r = icfg.registry
        self.registry: ModelRegistry[AvatarNetworks] = ModelRegistry(
            self._load, r.max_models, r.max_bytes, r.eviction, r.idle_unload_s
        )
        # Told of every UNet run (a batchers' BatchRun): metrics, tracing (observe.py).
        self.batch_events: list[Callable[[BatchRun], None]] = []

    def _batch_event(self, run: BatchRun) -> None:
        for listener in self.batch_events:
            listener(run)

    def _load(self, model_id: str) -> AvatarNetworks:
        m = self.catalog.get(model_id)
        icfg = self.cfg.inference
        cpu = CpuPrecision(
            m.cpu_precision or icfg.cpu_precision,
            m.unet_int8,
            QualityBounds(icfg.int8_min_mean_psnr_db, icfg.int8_min_worst_psnr_db),
        )
        with LoadMeter(self.cfg.inference.device_id) as meter:
            nets = load_networks(
                model_id,
                m.unet,
                m.audio_encoder,
                self._shared_encoder,
                self.session_opts,
                self.batch_policy,
                cpu,
            )
            t0 = time.perf_counter()
            nets.warm_up()
            log.info("warmed up %s in %.0f ms", model_id, (time.perf_counter() - t0) * 1e3)
        # at least the weights the sessions hold: a small model's load can fit in memory
        # the process had already (the measured growth is then ~0)
        nets.memory_bytes = max(meter.bytes, nets.nbytes)
        if nets.runner.batcher is not None:
            nets.runner.batcher.events = self._batch_event
        return nets

    def preload(self) -> None:
        """Load `inference.registry.preload` ("*": every avatar, up to max_models)."""
        self.registry.preload(self.cfg.inference.registry.preload, self.catalog.names)

    # -- audio ----------------------------------------------------------------
    def clip_blocks(
        self,
        nets: AvatarNetworks,
        samples: np.ndarray,
        frame_indices: Sequence[int] | np.ndarray,
        timings: Timings,
        sample_offset: int = 0,
    ) -> np.ndarray:
        """Audio blocks [len(frame_indices), 32, 16, 16] of clip frames (any index >= 0).

        `samples` are the clip's 16 kHz samples from `sample_offset` on (a multiple of
        `lookahead.TAIL_ALIGN`; 0 = the whole clip), so a stream can send only the tail its
        next frames need. Frame indices are the whole clip's; frames whose windows would need the
        omitted samples are refused.
        """
        if sample_offset < 0 or sample_offset % lookahead.TAIL_ALIGN:
            raise RequestError(
                f"sample_offset must be a multiple of {lookahead.TAIL_ALIGN} samples"
            )
        idx = np.asarray(frame_indices, dtype=np.int64)
        # Only the span of the clip these frames depend on: from the aligned tail start
        # behind the first frame to the last frame's lookahead (the whole rest when the
        # frames reach the clip's end). Same blocks, and the cost of a batch no longer
        # grows with the clip's length (lookahead.samples_needed, tests/test_stream_semantics).
        # Frames far past the clip's end read its last rows (or zeros): the span never
        # starts past the clip (lookahead.clip_span), so clip_frame_offset costs nothing.
        total = sample_offset + len(samples)
        span_start, stop = lookahead.clip_span(total, int(idx.min()), int(idx.max()))
        start = max(sample_offset, span_start)
        if stop < total or start > sample_offset:
            samples = samples[start - sample_offset : stop - sample_offset]
            sample_offset = start
        t0 = time.perf_counter()
        spec = mel.melspectrogram(samples)
        t0 = timings.add("mel", t0)
        shift = sample_offset // audio.HOP  # mel rows not sent
        total_mel = len(spec) + shift
        n = windows.video_frame_count(total_mel)
        lo, hi = windows.encoder_rows_needed(n, idx)
        # windows.mel_window_starts(total_mel)[lo:hi], without the rows before lo
        starts = (
            np.minimum(
                (np.arange(lo, hi, dtype=np.int64) * audio.MEL_FPS) // audio.VIDEO_FPS,
                total_mel - audio.WINDOW,
            )
            - shift
        )
        # A tail's first 3 mel rows see the cut (zero padding, pre-emphasis), so skip them.
        if shift and starts.min() < 3:
            raise RequestError(
                f"frames from {int(idx.min())} need audio before sample_offset {sample_offset}"
            )
        features = nets.encoder.encode(windows.windows_at(spec, starts))
        t0 = timings.add("audio_encoder", t0)
        blocks = windows.feature_blocks(features, idx, first_row=lo, total_rows=n)
        timings.add("audio_blocks", t0)
        return blocks

    # -- the whole request --------------------------------------------------------
    def infer(self, req: EngineRequest) -> InferResult:
        """Mouth regions [B, 3, 320, 320] for one batch (see `EngineRequest`)."""
        timings = Timings()
        b = req.batch_size
        face_crops, visual, features = req.face_crops, req.visual, req.features
        if (face_crops is None) == (visual is None):
            raise RequestError("exactly one of face crops or visual input is required")
        if (req.clip is None) == (features is None):
            raise RequestError("audio is required: raw audio or audio features")
        t_load = time.perf_counter()
        nets = self.registry.get(req.model_id)
        timings.add("model_load", t_load)
        t_start = time.perf_counter()
        if req.clip is not None:
            frames = np.arange(b) + req.clip_frame_offset
            audio_in = self.clip_blocks(nets, req.clip, frames, timings, req.sample_offset)
        else:
            assert features is not None
            audio_in = (
                features if len(features) == b else np.broadcast_to(features, (b, 32, 16, 16))
            )
        scope = caller_scope.get()  # a stage boundary: drop the work of a caller who left
        if scope is not None and (why := scope.gone()):
            raise Expired(why)
        t0 = time.perf_counter()
        vis = visual if visual is not None else visual_input(face_crops)
        t0 = timings.add("visual_input", t0)
        out = nets.run_unet(vis, np.asarray(audio_in, np.float32))
        timings.add("unet", t0)
        self.registry.record(req.model_id, b, (time.perf_counter() - t_start) * 1000.0)
        return InferResult(out, timings, nets.provider)

    def close(self) -> None:
        self.registry.close()
