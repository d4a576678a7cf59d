"""Synthetic avatar packages for tests: textured frames, crop rects, small ONNX nets."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lipsync.avatars.package import (
    AUDIO_ENCODER_FILE,
    UNET_FILE,
    write_crop_rects,
    write_frames,
    write_manifest,
)
from lipsync.avatars.speech_signal import speech_like
from tests.onnx_models import build_test_encoder, build_test_unet

__all__ = ["make_avatar", "make_frames", "make_rects", "speech_like"]


def make_frames(n: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    frames = []
    for i in range(n):
        f = np.roll(base, shift=3 * i, axis=1).copy()
        cv2.putText(f, str(i), (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 2)
        frames.append(f)
    return frames


def make_rects(n: int, width: int, height: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + 100)
    rects = []
    for _ in range(n):
        size = int(rng.integers(min(width, height) // 4, min(width, height) // 2))
        x1 = int(rng.integers(0, width - size))
        y1 = int(rng.integers(0, height - size))
        rects.append([x1, y1, x1 + size, y1 + size])
    return rects


def make_avatar(
    root: Path,
    name: str,
    n_frames: int = 7,
    width: int = 256,
    height: int = 224,
    seed: int = 0,
    own_encoder: bool = True,
    frame_name: str = "{i}.png",
) -> Path:
    """Write an avatar package `<root>/<name>/` and return its folder.

    Frames are PNG by default so tests compare against exactly the pixels served.
    """
    folder = root / name
    folder.mkdir(parents=True)
    write_frames(folder, make_frames(n_frames, width, height, seed), frame_name)
    write_crop_rects(folder, make_rects(n_frames, width, height, seed))
    build_test_unet(folder / UNET_FILE, seed)
    if own_encoder:
        build_test_encoder(folder / AUDIO_ENCODER_FILE, seed + 1)
    write_manifest(folder, name, with_audio_encoder=own_encoder)
    return folder
