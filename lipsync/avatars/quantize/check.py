"""The int8 UNet's files in an avatar package, its calibration record, and the quality
check run when it is made (`lipsync-avatar quantize`) and again before it is served.

Files beside the float model (names fixed; avatar.yaml may name another `unet_int8`)::

    unet.int8.onnx        # the QDQ int8 UNet
    unet.int8.json        # its calibration record (CalibrationRecord)
    unet.int8.check.npz   # check inputs: `crops` uint8 [K,320,320,3], `audio` float32 [K,32,16,16]

Quality is measured on the mouth region the UNet paints (the reference's mask rectangle
of the 320x320 output, lipsync.core.visual MASK_*), as the uint8 pixels that are served
(mouth_to_uint8): PSNR of the int8 frame against the float32 frame, per frame.

Needs only numpy and ONNX Runtime (the inference service's dependencies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.avatars.package import CPU_PRECISIONS as PRECISIONS
from lipsync.avatars.package import INT8_UNET_FILE
from lipsync.core.tensors import UNET_AUDIO_SHAPE
from lipsync.core.visual import MASK_X0, MASK_X1, MASK_Y0, MASK_Y1, mouth_to_uint8, visual_input

RECORD_FILE = "unet.int8.json"
CHECK_FILE = "unet.int8.check.npz"
RECORD_FORMAT = 1
MAX_RECORD_BYTES = 64 * 1024
MAX_CHECK_FRAMES = 64
MAX_CHECK_BYTES = MAX_CHECK_FRAMES * (320 * 320 * 3 + 4 * int(np.prod(UNET_AUDIO_SHAPE))) + 4096
PSNR_CAP_DB = 99.0  # identical frames (infinite PSNR) are reported as this

__all__ = ["INT8_UNET_FILE", "PRECISIONS"]  # and the names below (lipsync.avatars.quantize)

UNetRun = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Int8RefusedError(RuntimeError):
    """An int8 UNet is not served: its files or its quality check failed. The avatar is
    served with its float model instead."""


@dataclass(frozen=True)
class QualityBounds:
    """PSNR (dB) of the int8 mouth region against float32 the check requires."""

    mean_psnr_db: float = 38.0  # mean over the check frames
    worst_psnr_db: float = 32.0  # every check frame


@dataclass(frozen=True)
class CheckResult:
    frames: int
    mean_psnr_db: float
    worst_psnr_db: float
    bounds: QualityBounds

    @property
    def passed(self) -> bool:
        return (
            self.mean_psnr_db >= self.bounds.mean_psnr_db
            and self.worst_psnr_db >= self.bounds.worst_psnr_db
        )

    def describe(self) -> str:
        return (
            f"mouth-region PSNR of int8 against float32 over {self.frames} frames: mean "
            f"{self.mean_psnr_db:.2f} dB (needs >= {self.bounds.mean_psnr_db:g}), worst "
            f"{self.worst_psnr_db:.2f} dB (needs >= {self.bounds.worst_psnr_db:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "mean_psnr_db": round(self.mean_psnr_db, 3),
            "worst_psnr_db": round(self.worst_psnr_db, 3),
            "min_mean_psnr_db": self.bounds.mean_psnr_db,
            "min_worst_psnr_db": self.bounds.worst_psnr_db,
            "passed": self.passed,
            "region": (
                f"rows {MASK_Y0}:{MASK_Y1}, columns {MASK_X0}:{MASK_X1} of the 320x320 "
                "mouth, uint8 as served"
            ),
        }


def mouth_psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, capped at PSNR_CAP_DB) of the mouth region of two UNet outputs
    float [B, 3, 320, 320] in [0, 1], compared as the uint8 pixels that are served."""
    return mouth_psnr_u8(mouth_to_uint8(np.asarray(reference)), mouth_to_uint8(np.asarray(test)))


def mouth_psnr_u8(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, capped at PSNR_CAP_DB) of the mouth region of two batches of
    served mouths, uint8 [B, 320, 320, 3] (or one [320, 320, 3])."""
    a = np.asarray(reference)[..., MASK_Y0:MASK_Y1, MASK_X0:MASK_X1, :]
    b = np.asarray(test)[..., MASK_Y0:MASK_Y1, MASK_X0:MASK_X1, :]
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected two uint8 mouth batches, got {a.shape} and {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(psnr, PSNR_CAP_DB)


def summarise(psnr: np.ndarray, bounds: QualityBounds) -> CheckResult:
    p = np.asarray(psnr, np.float64)
    return CheckResult(len(p), float(p.mean()), float(p.min()), bounds)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CalibrationRecord:
    """What `lipsync-avatar quantize` did and measured (unet.int8.json)."""

    float_sha256: str
    int8_sha256: str
    check: dict[str, Any]
    method: str = "onnxruntime quantize_static, QDQ, per-channel weights"
    calibrate_method: str = "MinMax"
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    nodes_excluded: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)  # quantized; []: ONNX Runtime's default
    attempts: list[dict[str, Any]] = field(default_factory=list)  # operator sets tried, checks
    samples: int = 0
    calibration_data: str = ""
    onnxruntime: str = ""
    created: str = ""
    seconds: float = 0.0
    format: int = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @staticmethod
    def from_dict(data: object, where: str) -> CalibrationRecord:
        if not isinstance(data, dict):
            raise Int8RefusedError(f"{where}: expected a JSON object")
        if data.get("format") != RECORD_FORMAT:
            raise Int8RefusedError(
                f"{where}: record format {data.get('format')!r}, expected {RECORD_FORMAT}"
            )
        names = {f.name for f in dataclasses.fields(CalibrationRecord)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("float_sha256", "int8_sha256"):
            if not isinstance(kwargs.get(key), str) or len(kwargs[key]) != 64:
                raise Int8RefusedError(f"{where}: '{key}' missing or not a sha256 hex digest")
        if not isinstance(kwargs.get("check"), dict):
            raise Int8RefusedError(f"{where}: 'check' missing")
        try:
            return CalibrationRecord(**kwargs)
        except TypeError as exc:
            raise Int8RefusedError(f"{where}: {exc}") from exc


def read_record(path: Path) -> CalibrationRecord:
    """The calibration record at `path`; Int8RefusedError if missing or malformed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise Int8RefusedError(f"{path.name}: no calibration record ({exc.strerror})") from exc
    if len(raw) > MAX_RECORD_BYTES:
        raise Int8RefusedError(f"{path.name}: larger than {MAX_RECORD_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Int8RefusedError(f"{path.name}: not valid JSON ({exc})") from exc
    return CalibrationRecord.from_dict(data, path.name)


def write_check_inputs(path: Path, crops: np.ndarray, audio: np.ndarray) -> None:
    """Store the check inputs (inner face crops uint8 [K,320,320,3], audio blocks)."""
    with open(path, "wb") as f:
        np.savez(f, crops=np.ascontiguousarray(crops, np.uint8), audio=audio.astype(np.float32))


def read_check_inputs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(visual float32 [K,6,320,320], audio float32 [K,32,16,16]) from a check file."""
    try:
        if path.stat().st_size > MAX_CHECK_BYTES:
            raise Int8RefusedError(f"{path.name}: larger than {MAX_CHECK_BYTES} bytes")
        with np.load(path, allow_pickle=False) as z:
            crops, audio = z["crops"], z["audio"]
    except Int8RefusedError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise Int8RefusedError(f"{path.name}: unreadable check inputs ({exc})") from exc
    k = len(crops)
    if not (
        crops.dtype == np.uint8
        and crops.shape[1:] == (320, 320, 3)
        and audio.dtype == np.float32
        and audio.shape == (k, *UNET_AUDIO_SHAPE)
        and 1 <= k <= MAX_CHECK_FRAMES
    ):
        raise Int8RefusedError(
            f"{path.name}: expected crops uint8 [K,320,320,3] and audio float32 "
            f"[K,32,16,16] with 1 <= K <= {MAX_CHECK_FRAMES}, got {crops.dtype} "
            f"{crops.shape} and {audio.dtype} {audio.shape}"
        )
    return visual_input(crops), audio


def compare_runs(
    float_run: UNetRun,
    int8_run: UNetRun,
    visual: np.ndarray,
    audio: np.ndarray,
    bounds: QualityBounds,
    batch: int = 4,
) -> CheckResult:
    """Run both UNets on the same inputs (in runs of `batch` frames) and compare."""
    psnr = []
    for i in range(0, len(visual), batch):
        v, a = visual[i : i + batch], audio[i : i + batch]
        psnr.append(mouth_psnr(float_run(v, a), int8_run(v, a)))
    return summarise(np.concatenate(psnr), bounds)


def check_int8_unet(
    float_path: Path,
    int8_path: Path,
    float_run: UNetRun,
    make_int8_run: Callable[[], UNetRun],
    bounds: QualityBounds,
) -> tuple[CalibrationRecord, CheckResult, UNetRun]:
    """The check before serving `int8_path`: its record (beside it) names this int8 file
    and this float model by their sha256 (a corrupted, replaced or stale int8 model is
    refused before anything parses it), then `make_int8_run()` (e.g. a session) and, on
    the stored check inputs, the int8 UNet's mouths stay within `bounds` of the float
    UNet's. Returns the record, the result and the int8 run; raises Int8RefusedError
    saying why not."""
    folder = int8_path.parent
    if not int8_path.is_file():
        raise Int8RefusedError(f"{int8_path.name} not found (run `lipsync-avatar quantize`)")
    record = read_record(folder / RECORD_FILE)
    if file_sha256(int8_path) != record.int8_sha256:
        raise Int8RefusedError(
            f"{int8_path.name} does not match its calibration record (sha256 differs): "
            "corrupted or replaced; re-run `lipsync-avatar quantize`"
        )
    if file_sha256(float_path) != record.float_sha256:
        raise Int8RefusedError(
            f"{float_path.name} changed since {int8_path.name} was made from it; "
            "re-run `lipsync-avatar quantize`"
        )
    visual, audio = read_check_inputs(folder / CHECK_FILE)
    int8_run = make_int8_run()
    result = compare_runs(float_run, int8_run, visual, audio, bounds)
    if not result.passed:
        raise Int8RefusedError(f"calibration check failed: {result.describe()}")
    return record, result, int8_run
