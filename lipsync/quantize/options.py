"""Options of `lipsync-avatar quantize` (lipsync.quantize.build), importable without
ONNX Runtime (the CLI builds its parser from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lipsync.quantize.check import QualityBounds

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
    # percentile (99.999 %) and Conv alone: measured best on the demo avatar (mean 38.9 dB
    # where MinMax over ONNX Runtime's whole operator set gave 36.3; docs/PERFORMANCE.md)
    calibration: str = "percentile"  # minmax | percentile | entropy
    op_types: tuple[str, ...] = ("Conv",)  # operators to quantize; (): ONNX Runtime's set
    bounds: QualityBounds = field(default_factory=QualityBounds)
    audio_encoder: Path | None = None  # for avatars without their own
    threads: int = 0  # ONNX Runtime intra-op threads (0: all cores)
