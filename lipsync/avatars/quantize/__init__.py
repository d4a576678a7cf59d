"""int8 UNets for the CPU: `lipsync-avatar quantize` (build.py: ONNX Runtime static
quantization, QDQ, calibrated on the avatar's own frames and speech-like audio) and the
calibration record and check the inference service runs before serving one (check.py).

check.py needs only numpy and ONNX Runtime (the inference service's dependencies);
build.py also needs the `onnx` package (the `tools` extra).
"""

from lipsync.avatars.quantize.check import (
    CHECK_FILE,
    INT8_UNET_FILE,
    PRECISIONS,
    PSNR_CAP_DB,
    RECORD_FILE,
    CalibrationRecord,
    CheckResult,
    Int8RefusedError,
    QualityBounds,
    check_int8_unet,
    mouth_psnr,
    mouth_psnr_u8,
    read_record,
)

__all__ = [
    "CHECK_FILE",
    "INT8_UNET_FILE",
    "PRECISIONS",
    "PSNR_CAP_DB",
    "RECORD_FILE",
    "CalibrationRecord",
    "CheckResult",
    "Int8RefusedError",
    "QualityBounds",
    "check_int8_unet",
    "mouth_psnr",
    "mouth_psnr_u8",
    "read_record",
]
