"""JPEG encoding of composited frames, re-encoding only the rows that changed.

Frames are encoded with a restart marker after every row of MCUs (16 pixel rows with
4:2:0 chroma), so each MCU row's entropy-coded segment depends on that row's pixels
alone. A composited frame differs from its background frame only in the rows of the
pasted crop rect, so the background's encoded rows are cached once, the changed band is
encoded on its own, and the rows are spliced: the result is byte for byte the JPEG of
the whole composited frame (tests/test_jpeg.py), for a fraction of the work (a mouth band
is about a third of a 720p frame). Restart markers are baseline JPEG; every decoder reads
them.

OpenCV's encoder (libjpeg-turbo inside the wheel) is used: on this project's machines it
measured faster than PyTurboJPEG 1.x, and PyTurboJPEG 2.x needs a libjpeg-turbo 3 that
Debian 12 lacks. `make bench` prints the cost per frame at 720p and 1080p.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

MCU = 16  # pixel rows per MCU row with 4:2:0 chroma subsampling
_SOS = 0xDA
_EOI = b"\xff\xd9"
# The end of an entropy-coded segment: a restart marker or EOI (stuffed 0xFF00 never match).
_SEGMENT_END = re.compile(rb"\xff[\xd0-\xd7\xd9]")


@dataclass(frozen=True)
class EncodedRows:
    """A JPEG split into its headers and one entropy-coded segment per MCU row."""

    header: bytes  # SOI .. SOS, for the full frame size
    rows: list[bytes]
    data: bytes  # the whole JPEG

    def join(self, rows: list[bytes] | None = None) -> bytes:
        rows = self.rows if rows is None else rows
        out = [self.header]
        for k, seg in enumerate(rows[:-1]):
            out += [seg, bytes((0xFF, 0xD0 + k % 8))]
        out += [rows[-1], _EOI]
        return b"".join(out)


def split_rows(data: bytes) -> EncodedRows:
    """Split a JPEG written with one restart interval per MCU row."""
    i = 2  # after SOI
    while True:
        if data[i] != 0xFF:
            raise ValueError("not a JPEG with the expected marker layout")
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == _SOS:
            break
    header, rows, start = data[:i], [], i
    for m in _SEGMENT_END.finditer(data, i):
        rows.append(data[start : m.start()])
        start = m.end()
        if m.group() == _EOI:
            break
    return EncodedRows(header, rows, data)


class JpegEncoder:
    def __init__(self, quality: int = 90):
        if not 1 <= quality <= 100:
            raise ValueError("JPEG quality must be in 1..100")
        self.quality = quality

    def _params(self, width: int) -> list[int]:
        return [
            int(cv2.IMWRITE_JPEG_QUALITY),
            self.quality,
            int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR),
            int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420),
            int(cv2.IMWRITE_JPEG_RST_INTERVAL),
            (width + MCU - 1) // MCU,
        ]

    def encode(self, bgr: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", bgr, self._params(bgr.shape[1]))
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()

    def encode_rows(self, bgr: np.ndarray) -> EncodedRows:
        """A frame's JPEG split into rows, to splice changed bands into later."""
        return split_rows(self.encode(bgr))

    @staticmethod
    def band(y1: int, y2: int, height: int) -> tuple[int, int]:
        """The pixel rows [top, bottom) of the MCU rows that pixel rows [y1, y2) touch."""
        top = (y1 // MCU) * MCU
        return top, min(height, -(-y2 // MCU) * MCU)

    def encode_band(self, base: EncodedRows, band: np.ndarray, top: int) -> bytes:
        """The JPEG of the base frame with pixel rows [top, top + len(band)) replaced by
        `band` (`top` a multiple of 16; the band ends on an MCU row or the frame's end)."""
        strip = split_rows(self.encode(band))
        first = top // MCU
        rows = base.rows[:first] + strip.rows + base.rows[first + len(strip.rows) :]
        return base.join(rows)
