"""The avatar package format, shared by both services and the tools.

An avatar is a folder under the avatars root::

    <root>/<folder>/
      avatar.yaml         # name, fps, unet, audio_encoder, frames, crop_rects
      unet.onnx           # [B,6,320,320] + [B,32,16,16] -> [B,3,320,320]
      audio_encoder.onnx  # [B,1,80,16] -> [B,512]; optional
      frames/             # full frames, ordered by the number in each file name
      crop_rects.json     # [[x1, y1, x2, y2], ...], one per frame

Paths in avatar.yaml are relative to the folder and must stay inside it. The API's
`model_id` is the manifest's `name`; a model id is only ever looked up in the
catalog built by scanning the root, never joined onto a path.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

MANIFEST_NAME = "avatar.yaml"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NUMBER = re.compile(r"(\d+)")


class AvatarError(ValueError):
    """An avatar package is malformed."""


class UnknownModelError(KeyError):
    """No avatar with this model id is served."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


def check_model_id(model_id: str) -> str:
    """Return `model_id` if it is a well-formed avatar name, else raise UnknownModelError.

    Well-formed: 1-128 characters of letters, digits, '_', '-', '.', not starting with
    a separator and never '..'-like. It is still only a dictionary key afterwards.
    """
    if not isinstance(model_id, str) or not model_id:
        raise UnknownModelError("model_id is empty")
    if not MODEL_ID_PATTERN.match(model_id) or ".." in model_id:
        raise UnknownModelError(
            f"invalid model_id {model_id!r}: use letters, digits, '_', '-', '.'"
        )
    return model_id


@dataclass(frozen=True)
class AvatarManifest:
    name: str
    folder: Path
    fps: int
    unet: Path
    audio_encoder: Path | None
    frames_dir: Path
    crop_rects: Path

    def frame_files(self) -> list[Path]:
        return list_frame_files(self.frames_dir)

    def load_crop_rects(self) -> np.ndarray:
        return load_crop_rects(self.crop_rects)


def _inside(folder: Path, rel: str, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise AvatarError(f"{folder / MANIFEST_NAME}: '{what}' must be a relative path")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise AvatarError(f"{folder / MANIFEST_NAME}: '{what}' points outside the avatar folder")
    return path


def load_manifest(folder: Path | str) -> AvatarManifest:
    """Read and check `<folder>/avatar.yaml` (files must exist; frames are not decoded)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise AvatarError(f"{path}: missing") from exc
    except yaml.YAMLError as exc:
        raise AvatarError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise AvatarError(f"{path}: expected a mapping")
    name = data.get("name", folder.name)
    try:
        check_model_id(str(name))
    except UnknownModelError as exc:
        raise AvatarError(f"{path}: {exc}") from exc
    fps = data.get("fps", 25)
    if not isinstance(fps, int) or fps <= 0:
        raise AvatarError(f"{path}: fps must be a positive integer")
    unet = _inside(folder, data.get("unet", "unet.onnx"), "unet")
    enc_rel = data.get("audio_encoder")
    if enc_rel is None and (folder / "audio_encoder.onnx").exists():
        enc_rel = "audio_encoder.onnx"
    audio_encoder = _inside(folder, enc_rel, "audio_encoder") if enc_rel else None
    frames_dir = _inside(folder, data.get("frames", "frames"), "frames")
    crop_rects = _inside(folder, data.get("crop_rects", "crop_rects.json"), "crop_rects")
    for p, what in ((unet, "unet"), (crop_rects, "crop_rects")):
        if not p.is_file():
            raise AvatarError(f"{path}: {what} file {p.name} not found")
    if audio_encoder is not None and not audio_encoder.is_file():
        raise AvatarError(f"{path}: audio_encoder file {audio_encoder.name} not found")
    if not frames_dir.is_dir():
        raise AvatarError(f"{path}: frames folder {frames_dir.name} not found")
    return AvatarManifest(
        name=str(name),
        folder=folder.resolve(),
        fps=fps,
        unet=unet,
        audio_encoder=audio_encoder,
        frames_dir=frames_dir,
        crop_rects=crop_rects,
    )


def list_frame_files(frames_dir: Path) -> list[Path]:
    """Image files of a frames folder in the numeric order of the number in each name."""
    files = []
    for p in frames_dir.iterdir():
        if p.suffix.lower() not in FRAME_SUFFIXES or not p.is_file():
            continue
        numbers = _NUMBER.findall(p.stem)
        if not numbers:
            raise AvatarError(f"{p}: frame file name has no number")
        files.append((int(numbers[-1]), p.name, p))
    files.sort()
    for (a, _, pa), (b, _, pb) in itertools.pairwise(files):
        if a == b:
            raise AvatarError(f"{pa.name} and {pb.name} have the same frame number {a}")
    if not files:
        raise AvatarError(f"{frames_dir}: no frames")
    return [p for _, _, p in files]


def load_crop_rects(path: Path) -> np.ndarray:
    """Crop rects `[N, 4]` int64 (x1, y1, x2, y2) from a JSON list."""
    try:
        rects = np.asarray(json.loads(Path(path).read_text()), dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise AvatarError(f"{path}: {exc}") from exc
    if rects.ndim != 2 or rects.shape[1] != 4 or len(rects) == 0:
        raise AvatarError(f"{path}: expected [[x1, y1, x2, y2], ...], got shape {rects.shape}")
    out = rects.astype(np.int64)
    if not np.array_equal(out, rects):
        raise AvatarError(f"{path}: crop rects must be integers")
    if np.any(out[:, 2] <= out[:, 0]) or np.any(out[:, 3] <= out[:, 1]):
        raise AvatarError(f"{path}: every rect needs x2 > x1 and y2 > y1")
    return out


def check_rects_fit(rects: np.ndarray, width: int, height: int, where: str) -> None:
    """Raise AvatarError unless every rect lies inside a width x height frame."""
    bad = (rects[:, 0] < 0) | (rects[:, 1] < 0) | (rects[:, 2] > width) | (rects[:, 3] > height)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise AvatarError(
            f"{where}: crop rect {i} {rects[i].tolist()} lies outside the {width}x{height} frame"
        )


class AvatarCatalog:
    """The avatars found under a root folder, by name. Rescans on demand.

    A folder whose manifest is broken is skipped with a log line, so one bad
    avatar never stops the others from being served.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._avatars: dict[str, AvatarManifest] = {}
        self.errors: dict[str, str] = {}
        self.rescan()

    def rescan(self) -> dict[str, AvatarManifest]:
        found: dict[str, AvatarManifest] = {}
        errors: dict[str, str] = {}
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if not (folder / MANIFEST_NAME).is_file():
                    continue
                try:
                    m = load_manifest(folder)
                except AvatarError as exc:
                    errors[folder.name] = str(exc)
                    log.warning("skipping avatar folder %s: %s", folder, exc)
                    continue
                if m.name in found:
                    msg = f"name {m.name!r} already used by {found[m.name].folder.name}"
                    errors[folder.name] = msg
                    log.warning("skipping avatar folder %s: %s", folder, msg)
                    continue
                found[m.name] = m
        else:
            log.warning("avatars root %s does not exist", self.root)
        with self._lock:
            self._avatars = found
            self.errors = errors
        return found

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._avatars)

    def get(self, model_id: str) -> AvatarManifest:
        """The manifest of `model_id`; rescans once if unknown (a new folder may have appeared)."""
        check_model_id(model_id)
        with self._lock:
            m = self._avatars.get(model_id)
        if m is None:
            m = self.rescan().get(model_id)
        if m is None:
            raise UnknownModelError(f"unknown model {model_id!r}")
        return m
