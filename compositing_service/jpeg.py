"""JPEG encoding of composited frames, re-encoding only the blocks that changed.

Frames are encoded with restart markers: every row of MCUs (16 pixel rows with 4:2:0
chroma) is cut into restart intervals of a few MCUs (`interval_mcus`), and each interval's
entropy-coded segment depends on that interval's pixels alone (restart markers reset the
DC prediction; 4:2:0 downsampling never crosses an MCU). A composited frame differs from
its background frame only inside the pasted crop rect, so the background's segments are
cached once, the rectangle of intervals the rect touches is encoded on its own, and its
segments are spliced in: the result is byte for byte the JPEG of the whole composited
frame (tests/test_jpeg.py), for a fraction of the work (at 720p a mouth region is about
an eighth of the frame). Restart markers are baseline JPEG; every decoder reads them.

OpenCV's encoder (libjpeg-turbo inside the wheel) is used: on this project's machines it
measured faster than PyTurboJPEG 1.x, and PyTurboJPEG 2.x needs a libjpeg-turbo 3 that
Debian 12 lacks. `make bench` prints the cost per frame at 720p and 1080p.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

MCU = 16  # pixels per MCU side with 4:2:0 chroma subsampling
# Restart interval: at most this many MCUs (64 pixels). A one-off comparison (2026-11-22,
# the bench's 720p frame and 270-pixel face rect, paste + region encode + splice): a
# whole MCU row per interval 1.66 ms a frame, 8 MCUs 0.99, 4 MCUs 1.02, 2 MCUs 1.21; the
# JPEG grows by 0.8% at 4 MCUs (a restart marker and byte alignment per interval).
MAX_INTERVAL_MCUS = 4
_SOS = 0xDA
_EOI = b"\xff\xd9"
_RST = [bytes((0xFF, 0xD0 + k)) for k in range(8)]
# The end of an entropy-coded segment: a restart marker or EOI (stuffed 0xFF00 never match).
_SEGMENT_END = re.compile(rb"\xff[\xd0-\xd7\xd9]")


def interval_mcus(width: int) -> int:
    """Restart interval for a frame `width` pixels wide: the largest divisor of its MCUs
    per row up to MAX_INTERVAL_MCUS, so intervals never straddle two MCU rows."""
    per_row = -(-width // MCU)
    return max(d for d in range(1, MAX_INTERVAL_MCUS + 1) if per_row % d == 0)


def _segment_spans(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Where a JPEG's headers (SOI .. SOS) end, and each entropy-coded segment's
    [start, end) (its marker, RSTn or EOI, follows at `end`)."""
    i = 2  # after SOI
    while True:
        if data[i] != 0xFF:
            raise ValueError("not a JPEG with the expected marker layout")
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == _SOS:
            break
    spans, start = [], i
    for m in _SEGMENT_END.finditer(data, i):
        spans.append((start, m.start()))
        start = m.end()
        if m.group() == _EOI:
            break
    return i, spans


def split_segments(data: bytes) -> tuple[bytes, list[memoryview]]:
    """A JPEG's headers and its entropy-coded segments (views of `data`), markers removed."""
    header_end, spans = _segment_spans(data)
    view = memoryview(data)
    return data[:header_end], [view[a:b] for a, b in spans]


@dataclass(frozen=True)
class EncodedFrame:
    """A frame's JPEG and where each restart interval starts in it, to splice re-encoded
    regions into (no copy of the JPEG is kept besides `data`)."""

    data: bytes  # the whole JPEG
    interval: int  # MCUs per restart interval
    per_row: int  # restart intervals per MCU row
    starts: list[int]  # offset of each interval's segment in `data`; then len(data)

    @staticmethod
    def of(data: bytes, width: int) -> EncodedFrame:
        """Index `data`, a JPEG `width` pixels wide from JpegEncoder.encode."""
        interval = interval_mcus(width)
        per_row = -(-width // MCU) // interval
        _, spans = _segment_spans(data)
        if len(spans) % per_row:
            raise ValueError(f"{len(spans)} restart intervals, not rows of {per_row}")
        return EncodedFrame(data, interval, per_row, [a for a, _ in spans] + [len(data)])

    @property
    def rows(self) -> int:
        return (len(self.starts) - 1) // self.per_row

    def splice(self, row: int, col: int, segments: list[memoryview], cols: int) -> bytes:
        """The JPEG with the intervals of MCU rows row.. and interval columns col..col+cols-1
        replaced by `segments` (row-major, `cols` per row). What lies between the replaced
        intervals (the other intervals with their markers) is copied from `data` in runs."""
        view, starts, per_row = memoryview(self.data), self.starts, self.per_row
        last = len(starts) - 2  # the interval followed by EOI
        g = row * per_row + col
        out: list[bytes | memoryview] = [view[: starts[g]]]
        for r in range(len(segments) // cols):
            g = (row + r) * per_row + col
            for c in range(cols):
                out += (segments[r * cols + c], _RST[(g + c) % 8] if g + c < last else _EOI)
            # to the next replaced row's first interval, or to the end
            nxt = g + per_row if r + 1 < len(segments) // cols else len(starts) - 1
            out.append(view[starts[g + cols] : starts[nxt]])
        return b"".join(out)


class JpegEncoder:
    def __init__(self, quality: int = 90):
        if not 1 <= quality <= 100:
            raise ValueError("JPEG quality must be in 1..100")
        self.quality = quality

    def _params(self, interval: int) -> list[int]:
        return [
            int(cv2.IMWRITE_JPEG_QUALITY),
            self.quality,
            int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR),
            int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420),
            int(cv2.IMWRITE_JPEG_RST_INTERVAL),
            interval,
        ]

    def _encode(self, bgr: np.ndarray, interval: int) -> bytes:
        ok, buf = cv2.imencode(".jpg", bgr, self._params(interval))
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()

    def encode(self, bgr: np.ndarray) -> bytes:
        """The frame's JPEG (with the restart intervals regions are spliced into)."""
        return self._encode(bgr, interval_mcus(bgr.shape[1]))

    def encode_frame(self, bgr: np.ndarray) -> EncodedFrame:
        """A frame's JPEG cut into restart intervals, to splice changed regions into."""
        return EncodedFrame.of(self.encode(bgr), bgr.shape[1])

    @staticmethod
    def region(rect: tuple[int, int, int, int], width: int, height: int) -> tuple[int, ...]:
        """(left, top, right, bottom): the pixels of the restart intervals that the pixel
        rect (x1, y1, x2, y2) touches, clipped to the frame."""
        x1, y1, x2, y2 = rect
        step = interval_mcus(width) * MCU
        return (
            x1 // step * step,
            y1 // MCU * MCU,
            min(width, -(-x2 // step) * step),
            min(height, -(-y2 // MCU) * MCU),
        )

    def encode_region(self, base: EncodedFrame, patch: np.ndarray, left: int, top: int) -> bytes:
        """The JPEG of the base frame with its pixels from (left, top) replaced by `patch`,
        a region from `region()` (its edges on restart intervals or the frame's edges)."""
        _, segments = split_segments(self._encode(patch, base.interval))
        cols = -(-patch.shape[1] // MCU) // base.interval
        return base.splice(top // MCU, left // (base.interval * MCU), segments, cols)
