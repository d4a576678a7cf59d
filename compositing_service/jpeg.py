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


def split_segments(data: bytes) -> tuple[bytes, list[bytes]]:
    """A JPEG's headers (SOI .. SOS) and its entropy-coded segments, markers removed."""
    i = 2  # after SOI
    while True:
        if data[i] != 0xFF:
            raise ValueError("not a JPEG with the expected marker layout")
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == _SOS:
            break
    segments, start = [], i
    for m in _SEGMENT_END.finditer(data, i):
        segments.append(data[start : m.start()])
        start = m.end()
        if m.group() == _EOI:
            break
    return data[:i], segments


def _markers(n: int) -> list[bytes]:
    """The marker after each of n segments: RST0..RST7 in turn, EOI after the last."""
    return [_RST[k % 8] for k in range(n - 1)] + [_EOI]


@dataclass(frozen=True)
class EncodedFrame:
    """A frame's JPEG, cut into restart intervals to splice re-encoded regions into."""

    data: bytes  # the whole JPEG
    header: bytes  # SOI .. SOS, for the full frame
    interval: int  # MCUs per restart interval
    per_row: int  # restart intervals per MCU row
    pieces: list[bytes]  # each interval's segment followed by its marker
    rows: list[bytes]  # each MCU row's pieces joined

    @staticmethod
    def of(data: bytes, width: int) -> EncodedFrame:
        """Cut `data`, a JPEG `width` pixels wide from JpegEncoder.encode."""
        interval = interval_mcus(width)
        per_row = -(-width // MCU) // interval
        header, segments = split_segments(data)
        if len(segments) % per_row:
            raise ValueError(f"{len(segments)} restart intervals, not rows of {per_row}")
        pieces = [s + m for s, m in zip(segments, _markers(len(segments)), strict=True)]
        rows = [b"".join(pieces[i : i + per_row]) for i in range(0, len(pieces), per_row)]
        return EncodedFrame(data, header, interval, per_row, pieces, rows)

    def splice(self, row: int, col: int, segments: list[bytes], cols: int) -> bytes:
        """The JPEG with the intervals of MCU rows row.. and interval columns col..col+cols-1
        replaced by `segments` (row-major, `cols` per row)."""
        n_rows = len(segments) // cols
        out = [self.header, *self.rows[:row]]
        n = len(self.pieces)
        for r in range(n_rows):
            first = (row + r) * self.per_row
            at = first + col
            out += self.pieces[first:at]
            for c in range(cols):
                g = at + c
                out += (segments[r * cols + c], _RST[g % 8] if g < n - 1 else _EOI)
            out += self.pieces[at + cols : first + self.per_row]
        out += self.rows[row + n_rows :]
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
