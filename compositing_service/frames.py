"""The frames store: each avatar's background frames and crop rects (a
`lipsync.serving.store.BoundedStore`: bounded by `compositing.frame_cache` max_avatars and
max_bytes, LRU; avatars load on first use or at start from the preload list, each once
even under concurrent first requests).

An avatar is held as its frame files' bytes (PNG/JPEG as on disk) and decoded a frame
at a time, on first use, into one LRU of decoded frames shared by every avatar
(`frame_cache.decoded_max_bytes`). So an avatar costs about its compressed size (plus
the JPEG of each frame served, cached once), loading one reads its files without
decoding them (only their headers, to check the crop rects fit), and a cold avatar's
first frame waits for one decode, not all. The decoded pixels are those `cv2.imread`
gives for the file, so composited frames are the same bytes as with every frame decoded
up front.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from compositing_service.jpeg import EncodedFrame, JpegEncoder
from lipsync.avatars.package import (
    AvatarCatalog,
    AvatarError,
    check_frame_header,
    check_rects_fit,
    image_size,
)
from lipsync.serving.store import BoundedStore

log = logging.getLogger(__name__)

DEFAULT_DECODED_BYTES = 1 << 30


class DecodedFrames:
    """An LRU of decoded frames, bounded in bytes, shared by the avatars of a store."""

    def __init__(self, max_bytes: int = DEFAULT_DECODED_BYTES):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            img = self._items.get(key)
            if img is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return img

    def put(self, key: tuple[int, int], img: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = img
            self.nbytes += img.nbytes
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes


_tokens = itertools.count()


def decode_image(data: bytes, where: str = "") -> np.ndarray:
    check_frame_header(data, where)  # dimensions from the header, before decoding
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{where}: cannot decode image")
    return img


class LazyFrames(Sequence[np.ndarray]):
    """An avatar's frames as file bytes, each decoded (BGR uint8, H x W x 3) when used."""

    def __init__(self, files: list[bytes], cache: DecodedFrames, names: list[str] | None = None):
        self.files = files
        self.cache = cache
        self.names = names
        self._token = next(_tokens)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self.files):
            raise IndexError(index)
        key = (self._token, i)
        img = self.cache.get(key)
        if img is None:
            img = decode_image(self.files[i], self.names[i] if self.names else f"frame {i}")
            self.cache.put(key, img)
        return img

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.files)


@dataclass
class AvatarFrames:
    name: str
    fps: int
    frames: Sequence[np.ndarray]  # BGR uint8, H x W x 3 (a LazyFrames when loaded here)
    rects: np.ndarray  # [N, 4] int64 x1, y1, x2, y2
    nbytes: int  # what the store counts: the files' bytes, plus each cached JPEG
    load_ms: float
    width: int = 0  # 0: frame 0's
    height: int = 0
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
                if key not in self._encoded:
                    self._encoded[key] = encoded
                    self.nbytes += len(encoded.data)
        return encoded

    @property
    def count(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        if self.width and self.height:
            return self.width, self.height
        h, w = self.frames[0].shape[:2]
        return w, h


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header; None when unsure: not a known format, or
    a JPEG with EXIF data, whose orientation may swap them when decoded."""
    if data[:2] == b"\xff\xd8" and data.find(b"Exif\x00\x00", 0, 1 << 16) != -1:
        return None
    return image_size(data)


def _read(path: Path) -> tuple[bytes, tuple[int, int]]:
    data = path.read_bytes()
    check_frame_header(data, str(path))  # no decompression bombs
    size = _header_size(data)
    if size is None:  # decode to know
        h, w = decode_image(data, str(path)).shape[:2]
        size = (w, h)
    return data, size


def load_avatar_frames(
    catalog: AvatarCatalog,
    model_id: str,
    threads: int = 4,
    decoded: DecodedFrames | None = None,
) -> AvatarFrames:
    t0 = time.perf_counter()
    m = catalog.get(model_id)
    files = m.frame_files()
    rects = m.load_crop_rects()
    if len(rects) != len(files):
        raise AvatarError(
            f"avatar {m.name}: {len(files)} frames but {len(rects)} crop rects "
            f"in {m.crop_rects.name}"
        )
    if len(files) > 16:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            read = list(pool.map(_read, files))
    else:
        read = [_read(f) for f in files]
    for i, ((_, (w, h)), f) in enumerate(zip(read, files, strict=True)):
        check_rects_fit(rects[i : i + 1], w, h, f"avatar {m.name} frame {f.name}")
    frames = LazyFrames([d for d, _ in read], decoded or DecodedFrames(), [str(f) for f in files])
    w, h = read[0][1] if read else (0, 0)
    return AvatarFrames(
        m.name, m.fps, frames, rects, frames.nbytes, (time.perf_counter() - t0) * 1e3, w, h
    )


class FrameStore(BoundedStore[AvatarFrames]):
    def __init__(
        self,
        catalog: AvatarCatalog,
        max_avatars: int,
        max_bytes: int,
        decoded_max_bytes: int = DEFAULT_DECODED_BYTES,
    ):
        self.decoded = DecodedFrames(decoded_max_bytes)
        super().__init__(
            lambda model_id: load_avatar_frames(catalog, model_id, decoded=self.decoded),
            max_avatars,
            max_bytes,
            what="avatar frames",
        )
        self.catalog = catalog

    def preload_ids(self, ids: list[str]) -> None:
        """Load the frames of `ids` ("*": every avatar in the catalog)."""
        self.preload(ids, self.catalog.names)
