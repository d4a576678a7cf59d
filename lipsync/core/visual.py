"""The reference's visual semantics, shared by both services: the face crop and pasting the
mouth back (compositing service), the UNet's visual input and the mouth's uint8 pixels
(inference service, and the compositing service for float payloads).

Exact to the SyncTalk_2D reference inference script (docs/SEMANTICS.md, "Face crop" and
"Paste-back"; ``tests/reference_impl.py`` is the literal oracle).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lipsync.core.tensors import CROP, INNER

__all__ = [
    "CROP",
    "INNER",
    "INNER_OFFSET",
    "MASK_X0",
    "MASK_X1",
    "MASK_Y0",
    "MASK_Y1",
    "face_crop",
    "inner",
    "mouth_to_uint8",
    "paste_back",
    "visual_input",
]

INNER_OFFSET = (CROP - INNER) // 2  # 4: inner = crop[4:324, 4:324]
# Masked (zeroed) area of the inner square, as half-open slices [Y0:Y1, X0:X1]. The
# reference fills cv2.rectangle(img, (5, 5, 310, 305), (0, 0, 0), -1); OpenCV draws the
# (x, y, w, h) rect from (x, y) to (x + w - 1, y + h - 1) inclusive, i.e. x = 5..314 and
# y = 5..309 (tests/test_visual.py checks this against OpenCV).
MASK_X0, MASK_X1 = 5, 315
MASK_Y0, MASK_Y1 = 5, 310

_INNER_SLICE = slice(INNER_OFFSET, INNER_OFFSET + INNER)

Rect = Sequence[int] | np.ndarray


def _rect(frame: np.ndarray, rect: Rect) -> tuple[int, int, int, int]:
    """Validate ``(x1, y1, x2, y2)`` against the frame and return it as ints."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    x1, y1, x2, y2 = (int(v) for v in rect)
    h, w = frame.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"crop rect {(x1, y1, x2, y2)} is empty or outside the {w}x{h} frame")
    return x1, y1, x2, y2


def face_crop(frame: np.ndarray, rect: Rect) -> np.ndarray:
    """The 328x328 face crop: ``cv2.resize(frame[y1:y2, x1:x2], (328, 328), INTER_CUBIC)``.

    Parameters
    ----------
    frame : np.ndarray
        uint8 BGR ``[H, W, 3]``.
    rect : sequence of 4 ints
        ``(x1, y1, x2, y2)``, inside the frame.

    Returns
    -------
    np.ndarray
        New uint8 ``[328, 328, 3]``.
    """
    x1, y1, x2, y2 = _rect(frame, rect)
    return cv2.resize(frame[y1:y2, x1:x2], (CROP, CROP), interpolation=cv2.INTER_CUBIC)


def inner(crop: np.ndarray) -> np.ndarray:
    """View of the 320x320 network square ``crop[4:324, 4:324]`` (no copy)."""
    return crop[_INNER_SLICE, _INNER_SLICE]


def visual_input(inner_crops: np.ndarray) -> np.ndarray:
    """UNet visual input of a batch.

    Parameters
    ----------
    inner_crops : np.ndarray
        uint8 BGR ``[B, 320, 320, 3]`` (or one ``[320, 320, 3]``, treated as B = 1).

    Returns
    -------
    np.ndarray
        C-contiguous float32 ``[B, 6, 320, 320]``: channels 0..2 the real square, 3..5 the
        same with ``[5:310, 5:315]`` zeroed, both CHW in BGR order and divided by 255.0
        (bit-identical to the reference's float32 ``x / 255.0``).
    """
    x = np.asarray(inner_crops)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != (INNER, INNER, 3) or x.dtype != np.uint8:
        raise ValueError(f"inner crops must be uint8 [B, 320, 320, 3], got {x.dtype} {x.shape}")
    b = x.shape[0]
    out = np.empty((b, 6, INNER, INNER), dtype=np.float32)
    real = out[:, :3]
    real[...] = x.transpose(0, 3, 1, 2)  # HWC -> CHW while converting to float32
    np.divide(real, np.float32(255.0), out=real)  # IEEE float32 division, as the reference
    out[:, 3:] = real
    out[:, 3:, MASK_Y0:MASK_Y1, MASK_X0:MASK_X1] = 0.0
    return out


def mouth_to_uint8(pred: np.ndarray) -> np.ndarray:
    """UNet output to uint8 pixels, as ``np.array(x.transpose(1, 2, 0) * 255, np.uint8)``.

    The product is taken in the input's float precision (float32 for float32 output, as the
    reference) and truncated; float16 input is first widened to float32, so a float16 value
    ``v`` gives ``floor(float32(v) * 255)`` (no float16 rounding of the product). Values are
    clipped to [0, 255] first, so out-of-range outputs saturate instead of wrapping.

    Parameters
    ----------
    pred : np.ndarray
        float ``[B, 3, 320, 320]`` (or ``[3, 320, 320]``) in [0, 1], BGR.

    Returns
    -------
    np.ndarray
        C-contiguous uint8 ``[B, 320, 320, 3]`` (``[320, 320, 3]`` for 3-d input).
    """
    p = np.asarray(pred)
    if p.dtype.kind != "f":
        raise ValueError(f"pred must be a float array, got {p.dtype}")
    if p.ndim not in (3, 4) or p.shape[-3] != 3:
        raise ValueError(f"pred must be [B, 3, H, W] or [3, H, W], got {p.shape}")
    dtype = np.float64 if p.dtype == np.float64 else np.float32
    # Per frame: scale, clip and truncate the contiguous CHW planes in one reused buffer
    # (it stays in cache), then interleave them into HWC with cv2.merge. Same bytes as
    # converting while transposing, 2.8x faster.
    y = np.empty(p.shape[-3:], dtype)

    def one(chw: np.ndarray) -> np.ndarray:
        np.multiply(chw, dtype(255.0), out=y, dtype=dtype)
        np.clip(y, 0.0, 255.0, out=y)
        return cv2.merge(list(y.astype(np.uint8)))  # astype: truncation toward zero

    if p.ndim == 3:
        return one(p)
    out = np.empty((p.shape[0], *p.shape[2:], 3), np.uint8)
    for i, chw in enumerate(p):
        out[i] = one(chw)
    return out


def paste_back(frame: np.ndarray, rect: Rect, crop: np.ndarray, mouth_u8: np.ndarray) -> None:
    """Paste the generated mouth into ``frame`` in place.

    ``c = crop.copy(); c[4:324, 4:324] = mouth_u8;
    frame[y1:y2, x1:x2] = cv2.resize(c, (x2 - x1, y2 - y1), INTER_CUBIC)``.

    ``crop`` is NOT modified (a private copy is written), so a cached crop can be passed
    directly.

    Parameters
    ----------
    frame : np.ndarray
        uint8 BGR ``[H, W, 3]``, written in place.
    rect : sequence of 4 ints
        ``(x1, y1, x2, y2)`` the crop was taken from.
    crop : np.ndarray
        uint8 ``[328, 328, 3]`` from :func:`face_crop` of this frame.
    mouth_u8 : np.ndarray
        uint8 ``[320, 320, 3]`` from :func:`mouth_to_uint8`.
    """
    x1, y1, x2, y2 = _rect(frame, rect)
    if crop.shape != (CROP, CROP, 3) or crop.dtype != np.uint8:
        raise ValueError(f"crop must be uint8 [328, 328, 3], got {crop.dtype} {crop.shape}")
    if mouth_u8.shape != (INNER, INNER, 3) or mouth_u8.dtype != np.uint8:
        raise ValueError(
            f"mouth must be uint8 [320, 320, 3], got {mouth_u8.dtype} {mouth_u8.shape}"
        )
    c = crop.copy()
    c[_INNER_SLICE, _INNER_SLICE] = mouth_u8
    region = frame[y1:y2, x1:x2]
    # resize straight into the frame; copy only if OpenCV had to allocate a new dst
    out = cv2.resize(c, (x2 - x1, y2 - y1), dst=region, interpolation=cv2.INTER_CUBIC)
    if out is not region:  # pragma: no cover - not seen with uint8 frames
        frame[y1:y2, x1:x2] = out
