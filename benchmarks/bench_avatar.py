"""The benchmark's avatar: the reference-size UNet and audio encoder with random weights
(built without PyTorch), and synthetic 1280x720 frames with a face-sized crop rect."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lipsync.avatars.nets import build_reference_audio_encoder, build_reference_unet, save_model
from lipsync.avatars.package import (
    AUDIO_ENCODER_FILE,
    MANIFEST_NAME,
    UNET_FILE,
    write_crop_rects,
    write_frames,
    write_manifest,
)

NAME = "bench"


def make_frame(width: int, height: int, i: int = 0) -> np.ndarray:
    """A smooth, photo-like synthetic frame (JPEG cost close to a real video frame)."""
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    frame = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 3, frame.shape)  # about a camera frame's JPEG size
    frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
    cx, cy = width // 2 + int(8 * np.sin(i / 5)), height // 2
    cv2.ellipse(frame, (cx, cy), (width // 8, height // 4), 0, 0, 360, (120, 150, 200), -1)
    return frame


def face_rect(width: int, height: int, i: int = 0) -> list[int]:
    """A square lower-face rect about a quarter of the frame height (like a 720p talking head)."""
    side = height * 3 // 8
    x1 = width // 2 - side // 2 + int(8 * np.sin(i / 5))
    y1 = height // 2
    return [x1, y1, x1 + side, y1 + side]


def build(root: Path, n_frames: int = 50, width: int = 1280, height: int = 720) -> Path:
    """Write (once) the bench avatar under `root` and return its folder."""
    folder = root / NAME
    if (folder / MANIFEST_NAME).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_frames(folder, (make_frame(width, height, i) for i in range(n_frames)), "{i}.jpg")
    write_crop_rects(folder, [face_rect(width, height, i) for i in range(n_frames)])
    save_model(build_reference_unet(seed=0), folder / UNET_FILE)
    save_model(build_reference_audio_encoder(seed=0), folder / AUDIO_ENCODER_FILE)
    write_manifest(folder, NAME)
    return folder


def use_tiny_avatar(env: dict[str, str], prefix: str) -> str:
    """Point `env`'s avatars root at a new temporary one holding a small test avatar (7
    frames, tiny networks: per-frame cost is then mostly the services' own); returns its
    model id. For the benchmarks' `--tiny` runs."""
    import tempfile

    from tests.avatar_factory import make_avatar

    root = Path(tempfile.mkdtemp(prefix=prefix))
    make_avatar(root, "tiny", n_frames=7)
    env["AVATARS_DIR"] = str(root)
    return "tiny"
