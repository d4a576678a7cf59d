"""Band re-encoding: splicing a re-encoded band of MCU rows into a background frame's
cached JPEG rows gives exactly the JPEG of the whole composited frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from compositing_service.background_cache import AvatarFrames
from compositing_service.compositor import Compositor
from compositing_service.jpeg import JpegEncoder, split_rows
from lipsync.visual import face_crop, paste_back
from tests.avatar_factory import make_frames


@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080), (200, 240), (333, 97)])
@pytest.mark.parametrize("quality", [75, 95])
def test_band_splice_is_byte_identical_to_the_whole_frame(size, quality):
    w, h = size
    base_img = make_frames(1, w, h, seed=w)[0]
    enc = JpegEncoder(quality)
    base = enc.encode_rows(base_img)
    assert len(base.rows) == -(-h // 16)
    rng = np.random.default_rng(h)
    for y1, y2 in [(0, 5), (h // 3, h // 3 + h // 4), (h - 7, h), (0, h), (17, 18)]:
        img = base_img.copy()
        img[y1:y2] = rng.integers(0, 256, img[y1:y2].shape, dtype=np.uint8)
        top, bottom = enc.band(y1, y2, h)
        assert top % 16 == 0 and top <= y1 and bottom >= y2
        spliced = enc.encode_band(base, img[top:bottom], top)
        assert spliced == enc.encode(img)
        decoded = cv2.imdecode(np.frombuffer(spliced, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == img.shape


def test_restart_markers_do_not_change_the_pixels():
    img = make_frames(1, 640, 360, seed=1)[0]
    ours = cv2.imdecode(np.frombuffer(JpegEncoder(90).encode(img), np.uint8), cv2.IMREAD_COLOR)
    ok, plain = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    assert np.array_equal(ours, cv2.imdecode(plain, cv2.IMREAD_COLOR))


def test_split_rows_round_trips():
    data = JpegEncoder(80).encode(make_frames(1, 300, 200, seed=2)[0])
    assert split_rows(data).join() == data


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
