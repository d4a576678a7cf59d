"""Frames as the reference script would draw them, for whole-service comparisons.

Built only from tests/reference_impl.py, OpenCV and ONNX Runtime sessions of the
avatar's own networks run one frame at a time, as the reference ran them.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import yaml

from tests import reference_impl as ref


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """What a frame looks like after JPEG at `quality` (OpenCV), for exact comparisons."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return decode_jpeg(buf.tobytes())


def decode_jpeg(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a JPEG"
    return img


class Oracle:
    def __init__(self, folder: Path, encoder_path: Path | None = None):
        manifest = yaml.safe_load((folder / "avatar.yaml").read_text())
        files = sorted(
            (folder / manifest["frames"]).iterdir(),
            key=lambda p: int("".join(c for c in p.stem if c.isdigit())),
        )
        self.frames = [cv2.imread(str(f)) for f in files]
        self.rects = json.loads((folder / manifest["crop_rects"]).read_text())
        enc = folder / manifest["audio_encoder"] if manifest.get("audio_encoder") else encoder_path
        self.unet = ort.InferenceSession(
            str(folder / manifest["unet"]), providers=["CPUExecutionProvider"]
        )
        self.enc = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"])

    def encode(self, windows: np.ndarray) -> np.ndarray:
        name = self.enc.get_inputs()[0].name
        return np.concatenate([self.enc.run(None, {name: w[None]})[0] for w in windows])

    def audio_block(self, wav16k: np.ndarray, i: int) -> np.ndarray:
        mel = ref.ref_mel(wav16k)
        feats = self.encode(ref.ref_windows(mel))
        return ref.ref_block_for_frame(feats, i)

    def blocks(self, wav16k: np.ndarray, indices: list[int]) -> np.ndarray:
        mel = ref.ref_mel(wav16k)
        feats = self.encode(ref.ref_windows(mel))
        return np.stack([ref.ref_block_for_frame(feats, i) for i in indices])

    def mouth(self, visual: np.ndarray, block: np.ndarray) -> np.ndarray:
        v, a = (i.name for i in self.unet.get_inputs())
        return self.unet.run(None, {v: visual[None].astype(np.float32), a: block[None]})[0][0]

    def frame(self, t: int, block: np.ndarray, visual: np.ndarray | None = None) -> np.ndarray:
        """Composited stream frame t (background pingpong(t)) for one audio block."""
        i = ref.ref_pingpong(t, len(self.frames))
        crop, vis = ref.ref_visual_input(self.frames[i], self.rects[i])
        pred = self.mouth(vis if visual is None else visual, block)
        return ref.ref_paste(self.frames[i], self.rects[i], crop, pred)

    def clip_frames(
        self, wav16k: np.ndarray, batch: int, start: int = 0, offset: int = 0
    ) -> list[np.ndarray]:
        blocks = self.blocks(wav16k, [offset + k for k in range(batch)])
        return [self.frame(start + k, blocks[k]) for k in range(batch)]
