"""Options of `lipsync-avatar quantize` (lipsync.avatars.quantize.build), importable without
ONNX Runtime (the CLI builds its parser from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lipsync.avatars.quantize.check import QualityBounds

ACTIVATION_TYPES = ("quint8", "qint8")
CALIBRATIONS = ("minmax", "percentile", "entropy")  # ONNX Runtime's calibrators


class QuantizeError(RuntimeError):
    """The avatar cannot be quantized, or its int8 model failed the check."""


@dataclass(frozen=True)
class QuantizeOptions:
    samples: int = 32  # calibration frames (rounded up to an even number)
    check_frames: int = 8  # frames of the check (stored with the model)
    activation_type: str = "quint8"  # quint8 | qint8
    reduce_range: bool = False  # 7-bit weights (for CPUs without VNNI)
    keep_float: tuple[str, ...] = ()  # "first", "last": convolutions left in float
    # percentile (99.999 %): on the demo avatar MinMax gave 36.3 dB mean (docs/PERFORMANCE.md)
    calibration: str = "percentile"  # minmax | percentile | entropy
    # operators to quantize; (): ONNX Runtime's set; None: build.OP_TYPE_CANDIDATES in
    # turn, fastest first, until one passes the check
    op_types: tuple[str, ...] | None = None
    bounds: QualityBounds = field(default_factory=QualityBounds)
    audio_encoder: Path | None = None  # for avatars without their own
    threads: int = 0  # ONNX Runtime intra-op threads (0: all cores)
