"""The compositing pipeline stages of one batch: cut face crops from background
frames, and paste mouths back then JPEG-encode, spread over a thread pool
(OpenCV releases the GIL, so frames of a batch run in parallel)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from compositing_service.background_cache import AvatarFrames, pingpong
from compositing_service.jpeg import JpegEncoder
from lipsync.visual import INNER, face_crop, inner, paste_back


@dataclass
class BatchCrops:
    indices: list[int]  # background frame index of each output frame
    crops: list[np.ndarray]  # 328x328x3 crops (kept for the paste)
    inner: np.ndarray  # uint8 [B, 320, 320, 3], what the inference service gets


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
        return [pingpong(start + k, avatar.count) for k in range(batch)]

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
            x1, y1, x2, y2 = (int(v) for v in avatar.rects[i])
            crop = crops[k] if crops is not None else face_crop(frame, avatar.rects[i])
            # Only the restart intervals the rect touches change: paste into a copy of that
            # region and encode just the region (compositing_service/jpeg.py).
            h, w = frame.shape[:2]
            left, top, right, bottom = JpegEncoder.region((x1, y1, x2, y2), w, h)
            patch = frame[top:bottom, left:right].copy()
            paste_back(patch, (x1 - left, y1 - top, x2 - left, y2 - top), crop, mouths[k])
            return self.jpeg.encode_region(avatar.encoded(i, self.jpeg), patch, left, top)

        return list(self.pool.map(one, range(len(indices))))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
