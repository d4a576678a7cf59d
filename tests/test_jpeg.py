"""Region re-encoding: splicing a re-encoded rectangle of restart intervals into a
background frame's cached JPEG gives exactly the JPEG of the whole composited frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from compositing_service.compositor import Compositor
from compositing_service.frames import AvatarFrames
from compositing_service.jpeg import EncodedFrame, JpegEncoder, interval_mcus
from lipsync.core.visual import face_crop, paste_back
from tests.avatar_factory import make_frames


@pytest.mark.parametrize(
    # 80, 120 and 21 MCUs per row (intervals of 4, 4 and 3 MCUs); 13 and 7 (prime: 1 MCU)
    "size",
    [(1280, 720), (1920, 1080), (333, 97), (200, 240), (100, 100)],
)
@pytest.mark.parametrize("quality", [75, 95])
def test_region_splice_is_byte_identical_to_the_whole_frame(size, quality):
    w, h = size
    base_img = make_frames(1, w, h, seed=w)[0]
    enc = JpegEncoder(quality)
    base = enc.encode_frame(base_img)
    assert base.rows == -(-h // 16) and base.per_row * base.interval == -(-w // 16)
    rng = np.random.default_rng(h)
    rects = [(0, 0, 5, 5), (w // 3, h // 3, w // 3 + w // 4, h // 3 + h // 4)]
    rects += [(w - 7, h - 7, w, h), (0, 0, w, h), (17, 17, 18, 18), (w // 2, 0, w, h // 2)]
    for x1, y1, x2, y2 in rects:
        img = base_img.copy()
        img[y1:y2, x1:x2] = rng.integers(0, 256, img[y1:y2, x1:x2].shape, dtype=np.uint8)
        left, top, right, bottom = enc.region((x1, y1, x2, y2), w, h)
        assert top % 16 == 0 and left % (16 * base.interval) == 0
        assert left <= x1 and top <= y1 and right >= x2 and bottom >= y2
        spliced = enc.encode_region(base, img[top:bottom, left:right], left, top)
        assert spliced == enc.encode(img)
        decoded = cv2.imdecode(np.frombuffer(spliced, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == img.shape


def test_restart_intervals_never_straddle_mcu_rows():
    for width in range(1, 2000, 7):
        per_row = -(-width // 16)
        k = interval_mcus(width)
        assert 1 <= k <= 4 and per_row % k == 0


def test_restart_markers_do_not_change_the_pixels():
    img = make_frames(1, 640, 360, seed=1)[0]
    ours = cv2.imdecode(np.frombuffer(JpegEncoder(90).encode(img), np.uint8), cv2.IMREAD_COLOR)
    ok, plain = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    assert np.array_equal(ours, cv2.imdecode(plain, cv2.IMREAD_COLOR))


def test_an_unchanged_frame_splices_back_to_itself():
    img = make_frames(1, 300, 200, seed=2)[0]
    enc = JpegEncoder(80)
    frame = enc.encode_frame(img)
    assert EncodedFrame.of(frame.data, 300) == frame
    assert frame.rows == 13 and frame.per_row == 19  # 300 px: 19 MCUs, intervals of 1
    left, top, right, bottom = enc.region((64, 32, 130, 90), 300, 200)
    assert enc.encode_region(frame, img[top:bottom, left:right], left, top) == frame.data


def test_compositor_output_is_the_jpeg_of_the_composited_frame():
    frames = make_frames(3, 320, 256, seed=5)
    rects = np.array([[40, 60, 200, 220], [0, 0, 100, 100], [150, 100, 320, 256]])
    avatar = AvatarFrames("t", 25, frames, rects, 0, 0.0)
    comp = Compositor(jpeg_quality=88, workers=2)
    mouths = np.random.default_rng(0).integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    try:
        got = comp.composite(avatar, [0, 1, 2], mouths)
    finally:
        comp.close()
    for k in range(3):
        img = frames[k].copy()
        paste_back(img, rects[k], face_crop(frames[k], rects[k]), mouths[k])
        assert got[k] == JpegEncoder(88).encode(img)
    assert all(np.array_equal(frames[k], make_frames(3, 320, 256, seed=5)[k]) for k in range(3))
