"""The compositing pipeline stages of one batch: cut face crops from background
frames, and paste mouths back then JPEG-encode, spread over a thread pool
(OpenCV releases the GIL, so frames of a batch run in parallel)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from compositing_service.frames import AvatarFrames
from compositing_service.jpeg import EncodedFrame, JpegEncoder
from lipsync.core.tensors import INNER
from lipsync.core.timeline import background_indices
from lipsync.core.visual import face_crop, inner, paste_back


@dataclass
class BatchCrops:
    indices: list[int]  # background frame index of each output frame
    crops: list[np.ndarray]  # 328x328x3 crops (kept for the paste)
    inner: np.ndarray  # uint8 [B, 320, 320, 3], what the inference service gets


def paste_and_encode(
    jpeg: JpegEncoder,
    frame: np.ndarray,
    rect: Sequence[int] | np.ndarray,
    crop: np.ndarray,
    mouth_u8: np.ndarray,
    encoded: EncodedFrame,
) -> bytes:
    """The JPEG of `frame` (not changed) with `mouth_u8` pasted at `rect`. Only the restart
    intervals the rect touches change: paste into a copy of that region and encode just
    the region into `encoded`, the frame's cached JPEG (compositing_service/jpeg.py)."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    h, w = frame.shape[:2]
    left, top, right, bottom = JpegEncoder.region((x1, y1, x2, y2), w, h)
    patch = frame[top:bottom, left:right].copy()
    paste_back(patch, (x1 - left, y1 - top, x2 - left, y2 - top), crop, mouth_u8)
    return jpeg.encode_region(encoded, patch, left, top)


class Compositor:
    def __init__(self, jpeg_quality: int, workers: int = 0):
        # Frames run in parallel on this pool; OpenCV's own threads on top would only
        # oversubscribe the cores.
        cv2.setNumThreads(1)
        self.jpeg = JpegEncoder(jpeg_quality)
        self.pool = ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="composite"
        )

    @staticmethod
    def background_indices(avatar: AvatarFrames, start: int, batch: int) -> list[int]:
        return background_indices(start, batch, avatar.count)

    def crops(self, avatar: AvatarFrames, indices: list[int]) -> BatchCrops:
        crops = list(self.pool.map(lambda i: face_crop(avatar.frames[i], avatar.rects[i]), indices))
        stacked = np.empty((len(crops), INNER, INNER, 3), np.uint8)
        for k, c in enumerate(crops):
            stacked[k] = inner(c)
        return BatchCrops(indices, crops, stacked)

    def composite(
        self,
        avatar: AvatarFrames,
        indices: list[int],
        mouths: np.ndarray,
        crops: list[np.ndarray] | None = None,
    ) -> list[bytes]:
        """Paste mouths (uint8 [B,320,320,3]) into the frames (never changing the cached
        ones); JPEG each."""

        def one(k: int) -> bytes:
            i = indices[k]
            frame = avatar.frames[i]
            crop = crops[k] if crops is not None else face_crop(frame, avatar.rects[i])
            encoded = avatar.encoded(i, self.jpeg)
            return paste_and_encode(self.jpeg, frame, avatar.rects[i], crop, mouths[k], encoded)

        return list(self.pool.map(one, range(len(indices))))

    def composite_images(
        self,
        avatar: AvatarFrames,
        indices: list[int],
        mouths: np.ndarray,
        crops: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Paste mouths (uint8 [B,320,320,3]) into copies of the frames: the composited
        pictures themselves (for a video encoder; no JPEG)."""

        def one(k: int) -> np.ndarray:
            i = indices[k]
            frame = avatar.frames[i].copy()
            crop = crops[k] if crops is not None else face_crop(frame, avatar.rects[i])
            paste_back(frame, avatar.rects[i], crop, mouths[k])
            return frame

        return list(self.pool.map(one, range(len(indices))))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
