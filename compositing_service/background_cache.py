"""Background frames and crop rects of avatars, decoded and held in memory.

Bounded by avatar count and bytes with LRU eviction; avatars load on first use or
at start (the preload list), each once even under concurrent first requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from compositing_service.jpeg import EncodedFrame, JpegEncoder
from lipsync.avatar_package import AvatarCatalog, AvatarError, check_rects_fit

log = logging.getLogger(__name__)


def pingpong(t: int, n: int) -> int:
    """Background frame of stream frame t over n frames: 0, 1, .., n-1, n-2, .., 1, 0, 1, ..

    `m = t mod 2(n-1)`, then `m` if `m < n` else `2(n-1) - m` (the reference's walk).
    """
    if n <= 1:
        return 0
    m = t % (2 * (n - 1))
    return m if m < n else 2 * (n - 1) - m


@dataclass
class AvatarFrames:
    name: str
    fps: int
    frames: list[np.ndarray]  # BGR uint8, H x W x 3
    rects: np.ndarray  # [N, 4] int64 x1, y1, x2, y2
    nbytes: int
    load_ms: float
    _encoded: dict[tuple[int, int], EncodedFrame] = field(default_factory=dict)
    _encoded_lock: threading.Lock = field(default_factory=threading.Lock)

    def encoded(self, index: int, encoder: JpegEncoder) -> EncodedFrame:
        """Background frame `index` JPEG-encoded (once per quality) and cut into restart
        intervals: the idle frame as it is, and what composited frames splice into."""
        key = (index, encoder.quality)
        with self._encoded_lock:
            encoded = self._encoded.get(key)
        if encoded is None:
            encoded = encoder.encode_frame(self.frames[index])
            with self._encoded_lock:
                self._encoded[key] = encoded
        return encoded

    @property
    def count(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.frames[0].shape[:2]
        return w, h


def _read_frame(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{path}: cannot decode image")
    return img


def load_avatar_frames(catalog: AvatarCatalog, model_id: str, threads: int = 4) -> AvatarFrames:
    t0 = time.perf_counter()
    m = catalog.get(model_id)
    files = m.frame_files()
    rects = m.load_crop_rects()
    if len(rects) != len(files):
        raise AvatarError(
            f"avatar {m.name}: {len(files)} frames but {len(rects)} crop rects "
            f"in {m.crop_rects.name}"
        )
    with ThreadPoolExecutor(max_workers=threads) as pool:
        frames = list(pool.map(_read_frame, files))
    for i, (img, f) in enumerate(zip(frames, files, strict=True)):
        h, w = img.shape[:2]
        check_rects_fit(rects[i : i + 1], w, h, f"avatar {m.name} frame {f.name}")
    nbytes = sum(f.nbytes for f in frames)
    return AvatarFrames(m.name, m.fps, frames, rects, nbytes, (time.perf_counter() - t0) * 1e3)


class BackgroundCache:
    def __init__(self, catalog: AvatarCatalog, max_avatars: int, max_bytes: int):
        self.catalog = catalog
        self.max_avatars = max(1, max_avatars)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Lock] = {}
        self._items: OrderedDict[str, AvatarFrames] = OrderedDict()

    def get(self, model_id: str) -> AvatarFrames:
        with self._lock:
            item = self._items.get(model_id)
            if item is not None:
                self._items.move_to_end(model_id)
                return item
            gate = self._gates.setdefault(model_id, threading.Lock())
        with gate:
            with self._lock:
                item = self._items.get(model_id)
                if item is not None:
                    return item
            item = load_avatar_frames(self.catalog, model_id)
            if item.nbytes > self.max_bytes:
                raise AvatarError(
                    f"avatar {model_id}: its frames need {item.nbytes} bytes, more than "
                    f"compositing.frame_cache.max_bytes ({self.max_bytes})"
                )
            with self._lock:
                while self._items and (
                    len(self._items) + 1 > self.max_avatars
                    or self.cached_bytes() + item.nbytes > self.max_bytes
                ):
                    victim, _ = self._items.popitem(last=False)
                    log.info("evicted background frames of %s", victim)
                self._items[model_id] = item
            log.info(
                "cached %d frames of %s (%dx%d, %.1f MB) in %.0f ms",
                item.count,
                model_id,
                *item.size,
                item.nbytes / 1e6,
                item.load_ms,
            )
            return item

    def cached_bytes(self) -> int:
        return sum(i.nbytes for i in self._items.values())

    def peek(self, model_id: str) -> AvatarFrames | None:
        with self._lock:
            return self._items.get(model_id)

    def drop(self, model_id: str) -> bool:
        with self._lock:
            return self._items.pop(model_id, None) is not None

    def preload(self, ids: list[str]) -> None:
        if "*" in ids:
            ids = self.catalog.names()
        for model_id in ids[: self.max_avatars]:
            try:
                self.get(model_id)
            except Exception as exc:  # one bad avatar must not stop the others
                log.error("preloading frames of %s failed: %s", model_id, exc)
