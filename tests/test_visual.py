"""lipsync.visual against the reference semantics (tests/reference_impl.py)
and against OpenCV's own behaviour."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync.core.tensors import CROP, INNER
from lipsync.core.visual import (
    INNER_OFFSET,
    MASK_X0,
    MASK_X1,
    MASK_Y0,
    MASK_Y1,
    face_crop,
    inner,
    mouth_to_uint8,
    paste_back,
    visual_input,
)
from tests.reference_impl import ref_paste, ref_pingpong, ref_visual_input

H, W = 480, 640
RECTS = [
    (100, 150, 400, 450),  # 300 -> 328 (upscale)
    (0, 0, 200, 200),  # top-left corner
    (440, 280, 640, 480),  # touches the right and bottom edges
    (50, 60, 250, 400),  # not square
    (10, 10, 470, 470),  # 460 -> 328 (downscale)
    (5, 7, 25, 27),  # tiny
]


def make_frame(seed: int) -> np.ndarray:
    """Smooth gradients plus noise and a few hard edges (to exercise cubic overshoot)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([xx * 255 / W, yy * 255 / H, (xx + yy) * 255 / (W + H)], axis=-1)
    img = base + rng.normal(0, 20, (H, W, 3))
    img[::37] = 255
    img[:, ::41] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pred(seed: int, b: int | None = None, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (3, INNER, INNER) if b is None else (b, 3, INNER, INNER)
    return rng.uniform(0, 1, shape).astype(dtype)


# --------------------------------------------------------------------------- mask


def test_mask_rectangle_is_what_opencv_fills() -> None:
    img = np.full((INNER, INNER, 3), 255, dtype=np.uint8)
    cv2.rectangle(img, (5, 5, 310, 305), (0, 0, 0), -1)
    zero = np.all(img == 0, axis=-1)
    ys, xs = np.nonzero(zero)
    # inclusive x = 5..314, y = 5..309
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 314, 5, 309)
    expected = np.zeros((INNER, INNER), dtype=bool)
    expected[MASK_Y0:MASK_Y1, MASK_X0:MASK_X1] = True
    assert np.array_equal(zero, expected)
    assert zero.sum() == 310 * 305
    assert np.all(img[~zero] == 255)


def test_visual_input_masks_exactly_that_rectangle() -> None:
    x = visual_input(np.full((1, INNER, INNER, 3), 255, dtype=np.uint8))
    assert np.all(x[0, :3] == 1.0)
    img = np.full((INNER, INNER, 3), 255, dtype=np.uint8)
    cv2.rectangle(img, (5, 5, 310, 305), (0, 0, 0), -1)
    assert np.array_equal(x[0, 3:], img.transpose(2, 0, 1).astype(np.float32) / 255.0)


# ----------------------------------------------------------------------- face crop


@pytest.mark.parametrize("rect", RECTS)
def test_face_crop_and_visual_input_match_reference(rect) -> None:
    frame = make_frame(1)
    keep = frame.copy()
    crop = face_crop(frame, rect)
    ref_crop, ref_x = ref_visual_input(frame, rect)
    assert crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, ref_crop)
    x = visual_input(inner(crop)[None])
    assert x.shape == (1, 6, INNER, INNER) and x.dtype == np.float32 and x.flags.c_contiguous
    assert np.array_equal(x[0], ref_x)
    assert np.array_equal(frame, keep)


def test_face_crop_accepts_numpy_rect_and_views() -> None:
    big = make_frame(2)
    frame = big[10:400, 20:600]  # a non-contiguous view
    rect = np.array([30, 40, 230, 240], dtype=np.int32)
    ref_crop, _ = ref_visual_input(np.ascontiguousarray(frame), rect)
    assert np.array_equal(face_crop(frame, rect), ref_crop)


@pytest.mark.parametrize(
    "rect",
    [(-1, 0, 100, 100), (0, 0, W + 1, 100), (0, 0, 100, H + 1), (50, 50, 50, 80), (60, 50, 40, 80)],
)
def test_bad_rects_raise(rect) -> None:
    frame = make_frame(3)
    with pytest.raises(ValueError, match="rect"):
        face_crop(frame, rect)
    with pytest.raises(ValueError, match="rect"):
        paste_back(
            frame,
            rect,
            np.zeros((CROP, CROP, 3), np.uint8),
            np.zeros((INNER, INNER, 3), np.uint8),
        )


def test_inner_is_a_view() -> None:
    crop = face_crop(make_frame(4), RECTS[0])
    view = inner(crop)
    assert view.shape == (INNER, INNER, 3) and INNER_OFFSET == 4
    assert np.shares_memory(view, crop)
    assert np.array_equal(view, crop[4:324, 4:324])


# -------------------------------------------------------------------- visual input


def test_visual_input_batch_matches_reference() -> None:
    frame = make_frame(5)
    crops, refs = [], []
    for rect in RECTS[:4]:
        c, r = ref_visual_input(frame, rect)
        crops.append(inner(c))
        refs.append(r)
    batch = np.stack(crops)
    keep = batch.copy()
    x = visual_input(batch)
    assert x.shape == (4, 6, INNER, INNER)
    assert np.array_equal(x, np.stack(refs))
    assert np.array_equal(batch, keep)
    # a single [320, 320, 3] square is a batch of one
    assert np.array_equal(visual_input(crops[1]), x[1:2])


def test_visual_input_is_exact_for_every_byte_value() -> None:
    vals = np.arange(INNER * INNER * 3) % 256
    sq = vals.astype(np.uint8).reshape(INNER, INNER, 3)
    x = visual_input(sq[None])
    real = sq.transpose(2, 0, 1).astype(np.float32)
    assert np.array_equal(x[0, :3], real / 255.0)  # float32 / 255.0, bit for bit
    assert x[0, 0].max() == 1.0 and x[0, 0].min() == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, INNER, INNER, 3), np.float32),
        np.zeros((1, CROP, CROP, 3), np.uint8),
        np.zeros((1, INNER, INNER, 4), np.uint8),
    ],
)
def test_visual_input_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError):
        visual_input(bad)


# --------------------------------------------------------------------- mouth pixels


def _ref_u8(pred: np.ndarray) -> np.ndarray:
    """The reference conversion of one [3, 320, 320] output."""
    return np.array(pred.transpose(1, 2, 0) * 255, dtype=np.uint8)


def test_mouth_to_uint8_matches_reference() -> None:
    pred = make_pred(6, b=3)
    u8 = mouth_to_uint8(pred)
    assert u8.shape == (3, INNER, INNER, 3) and u8.dtype == np.uint8 and u8.flags.c_contiguous
    for b in range(3):
        assert np.array_equal(u8[b], _ref_u8(pred[b]))
    single = mouth_to_uint8(pred[1])
    assert single.shape == (INNER, INNER, 3) and np.array_equal(single, u8[1])


def _pred_with(values: np.ndarray, dtype) -> np.ndarray:
    pred = np.zeros((1, 3, INNER, INNER), dtype=dtype)
    pred.reshape(-1)[: values.size] = values
    return pred


def test_mouth_to_uint8_truncation_edges() -> None:
    below_one = np.nextafter(np.float32(1), np.float32(0))
    k255 = (np.arange(256) / 255).astype(np.float32)  # float32(k / 255) * 255 -> k
    vals = np.concatenate(
        [
            np.array([0.0, 1.0, below_one, 0.5, 1 / 255, 254.5 / 255, 1e-9], dtype=np.float32),
            k255,
            np.nextafter(k255, np.float32(0)),  # just below k / 255 -> k - 1
        ]
    )
    pred = _pred_with(vals, np.float32)
    got = mouth_to_uint8(pred)[0].transpose(2, 0, 1).reshape(-1)[: vals.size]
    ref = _ref_u8(pred[0]).transpose(2, 0, 1).reshape(-1)[: vals.size]
    assert np.array_equal(got, ref)
    assert got[:7].tolist() == [0, 255, 254, 127, 1, 254, 0]
    assert np.array_equal(got[7 : 7 + 256], np.arange(256))
    assert np.array_equal(got[7 + 256 + 1 :], np.arange(255))  # k - 1 for k >= 1


def test_mouth_to_uint8_out_of_range_saturates() -> None:
    vals = np.array([-0.5, -1e-7, 1.0 + 1e-6, 1.004, 2.0, 1e9], dtype=np.float32)
    got = mouth_to_uint8(_pred_with(vals, np.float32))[0].transpose(2, 0, 1).reshape(-1)
    assert got[: vals.size].tolist() == [0, 0, 255, 255, 255, 255]


def test_mouth_to_uint8_float16() -> None:
    # every float16 in [0, 1]: the result is floor(v * 255) of the exact value (widened to
    # float32, where v * 255 is exact), which is also what a float32 output v gives
    all_h = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)
    pred = _pred_with(all_h, np.float16)
    got = mouth_to_uint8(pred)
    assert np.array_equal(got, mouth_to_uint8(pred.astype(np.float32)))
    flat = got[0].transpose(2, 0, 1).reshape(-1)[: all_h.size]
    exact = np.floor(all_h.astype(np.float64) * 255).astype(np.uint8)
    assert np.array_equal(flat, exact)
    one, below = np.float16(1.0), np.nextafter(np.float16(1), np.float16(0))
    near = np.float16(1 / 255)  # 0.0039176..., just below 1/255
    h = mouth_to_uint8(_pred_with(np.array([one, below, near], np.float16), np.float16))
    assert h[0].transpose(2, 0, 1).reshape(-1)[:3].tolist() == [255, 254, 0]
    # (a product taken in float16 would round 0.999 up to 1.0 and give 1)
    assert int(np.array(near * np.float16(255), dtype=np.uint8)) == 1


def test_mouth_to_uint8_float64_is_computed_in_float64() -> None:
    pred = make_pred(7, b=1, dtype=np.float64)
    assert np.array_equal(mouth_to_uint8(pred)[0], _ref_u8(pred[0]))


def test_mouth_to_uint8_rejects_integers() -> None:
    with pytest.raises(ValueError):
        mouth_to_uint8(np.zeros((1, 3, INNER, INNER), np.uint8))


# ----------------------------------------------------------------------- paste back


@pytest.mark.parametrize("rect", RECTS)
def test_paste_back_matches_reference(rect) -> None:
    frame = make_frame(8)
    pred = make_pred(9)
    crop, _ = ref_visual_input(frame, rect)
    expected = ref_paste(frame, rect, crop, pred)
    crop_keep = crop.copy()
    out = frame.copy()
    assert paste_back(out, rect, crop, mouth_to_uint8(pred)) is None
    assert np.array_equal(out, expected)
    assert np.array_equal(crop, crop_keep)  # the caller's crop is not modified
    x1, y1, x2, y2 = rect
    outside = np.ones((H, W), dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], frame[outside])


def test_paste_back_into_a_frame_view() -> None:
    big = make_frame(10)
    frame = big[20:460, 30:630]  # a non-contiguous view into a bigger buffer
    rect = (100, 100, 300, 300)
    pred = make_pred(11)
    crop = face_crop(frame, rect)
    expected = ref_paste(np.ascontiguousarray(frame), rect, crop, pred)
    paste_back(frame, rect, crop, mouth_to_uint8(pred))
    assert np.array_equal(frame, expected)


def test_full_frame_round_trip() -> None:
    """crop -> visual input -> (fake net) -> mouth -> paste, vs the reference, batched."""
    frames = [make_frame(s) for s in (12, 13)]
    rects = [RECTS[0], RECTS[3]]
    crops = [face_crop(f, r) for f, r in zip(frames, rects, strict=True)]
    x = visual_input(np.stack([inner(c) for c in crops]))
    pred = x[:, 3:] * np.float32(0.5) + np.float32(0.25)  # stand-in for the UNet output
    mouths = mouth_to_uint8(pred)
    for k, (f, r, c) in enumerate(zip(frames, rects, crops, strict=True)):
        ref_crop, ref_x = ref_visual_input(f, r)
        assert np.array_equal(x[k], ref_x)
        expected = ref_paste(f, r, ref_crop, ref_x[3:] * np.float32(0.5) + np.float32(0.25))
        out = f.copy()
        paste_back(out, r, c, mouths[k])
        assert np.array_equal(out, expected)


def test_paste_back_validates_shapes() -> None:
    frame = make_frame(14)
    crop = np.zeros((CROP, CROP, 3), np.uint8)
    mouth = np.zeros((INNER, INNER, 3), np.uint8)
    with pytest.raises(ValueError, match="crop"):
        paste_back(frame, RECTS[0], crop[:-1], mouth)
    with pytest.raises(ValueError, match="mouth"):
        paste_back(frame, RECTS[0], crop, mouth.astype(np.float32))
    with pytest.raises(ValueError, match="frame"):
        paste_back(frame[..., :2], RECTS[0], crop, mouth)


# -------------------------------------------------------------- the oracle's ping-pong


def test_reference_pingpong() -> None:
    assert [ref_pingpong(t, 4) for t in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [ref_pingpong(t, 2) for t in range(5)] == [0, 1, 0, 1, 0]
    assert [ref_pingpong(t, 1) for t in range(3)] == [0, 0, 0]
