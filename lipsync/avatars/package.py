"""The avatar package format, shared by both services and the tools: its reader (the
manifest, frames list, crop rects, the catalog of a root folder) and its writer.

An avatar is a folder under the avatars root::

    <root>/<folder>/
      avatar.yaml         # name, fps, unet, audio_encoder, frames, crop_rects
      unet.onnx           # [B,6,320,320] + [B,32,16,16] -> [B,3,320,320]
      audio_encoder.onnx  # [B,1,80,16] -> [B,512]; optional
      frames/             # full frames, ordered by the number in each file name
      crop_rects.json     # [[x1, y1, x2, y2], ...], one per frame
      unet.int8.onnx      # optional: int8 UNet for the CPU (`lipsync-avatar quantize`),
                          # with unet.int8.json and unet.int8.check.npz beside it

avatar.yaml may also say `cpu_precision: float32|int8` (which UNet the CPU serves for
this avatar; default inference.cpu_precision) and `unet_int8` (default unet.int8.onnx).
Paths in avatar.yaml are relative to the folder and must stay inside it. The API's
`model_id` is the manifest's `name`; a model id is only ever looked up in the
catalog built by scanning the root, never joined onto a path.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

MANIFEST_NAME = "avatar.yaml"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# \A...\Z with fullmatch: "$" would accept a trailing newline ("demo\n")
MODEL_ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
MAX_MANIFEST_BYTES = 64 * 1024  # avatar.yaml is a few lines
MAX_FRAME_PIXELS = 4096 * 4096  # a frame's width x height, read from its header
RESCAN_INTERVAL_S = 5.0  # an unknown model id rescans the root at most this often
_NUMBER = re.compile(r"(\d+)")
CPU_PRECISIONS = ("float32", "int8")  # the UNet the CPU provider serves
INT8_UNET_FILE = "unet.int8.onnx"  # lipsync.avatars.quantize


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
    if not MODEL_ID_PATTERN.fullmatch(model_id) or ".." in model_id:
        raise UnknownModelError(
            f"invalid model_id {model_id[:200]!r}: use letters, digits, '_', '-', '.'"
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
    # lipsync.avatars.quantize: the int8 UNet if the package has one, and the avatar's own
    # choice of precision on the CPU (None: inference.cpu_precision decides)
    unet_int8: Path | None = None
    cpu_precision: str | None = None

    def frame_files(self) -> list[Path]:
        return list_frame_files(self.frames_dir, self.folder)

    def load_crop_rects(self) -> np.ndarray:
        return load_crop_rects(self.crop_rects)


def _inside(folder: Path, rel: str, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise AvatarError(f"{folder / MANIFEST_NAME}: '{what}' must be a relative path")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise AvatarError(f"{folder / MANIFEST_NAME}: '{what}' points outside the avatar folder")
    return path


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: a manifest is a few plain keys, and
    aliases let a few hundred bytes expand into gigabytes (a "billion laughs")."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in avatar.yaml")
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError("anchors are not allowed in avatar.yaml")
        return super().compose_node(parent, index)


def read_manifest_yaml(path: Path) -> object:
    """The parsed avatar.yaml: at most MAX_MANIFEST_BYTES, no anchors or aliases."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise AvatarError(f"{path}: missing") from exc
    except OSError as exc:
        raise AvatarError(f"{path}: {exc}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise AvatarError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_ManifestLoader)
    except UnicodeDecodeError as exc:
        raise AvatarError(f"{path}: not UTF-8") from exc
    except yaml.YAMLError as exc:
        raise AvatarError(f"{path}: not valid YAML: {str(exc)[:300]}") from exc


def load_manifest(folder: Path | str) -> AvatarManifest:
    """Read and check `<folder>/avatar.yaml` (files must exist; frames are not decoded)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    data = read_manifest_yaml(path)
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
    int8_rel = data.get("unet_int8")
    if int8_rel is None and (unet.parent / INT8_UNET_FILE).is_file():
        int8_rel = str((unet.parent / INT8_UNET_FILE).relative_to(folder.resolve()))
    unet_int8 = _inside(folder, int8_rel, "unet_int8") if int8_rel else None
    cpu_precision = data.get("cpu_precision")
    if cpu_precision is not None and cpu_precision not in CPU_PRECISIONS:
        raise AvatarError(
            f"{path}: cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, "
            f"got {str(cpu_precision)[:50]!r}"
        )
    return AvatarManifest(
        name=str(name),
        folder=folder.resolve(),
        fps=fps,
        unet=unet,
        audio_encoder=audio_encoder,
        frames_dir=frames_dir,
        crop_rects=crop_rects,
        unet_int8=unet_int8,
        cpu_precision=cpu_precision,
    )


def list_frame_files(frames_dir: Path, root: Path | None = None) -> list[Path]:
    """Image files of a frames folder in the numeric order of the number in each name.
    A file (or symlink) whose real path lies outside `root` (default: the frames
    folder) is refused."""
    files = []
    inside = (root or frames_dir).resolve()
    for p in frames_dir.iterdir():
        if p.suffix.lower() not in FRAME_SUFFIXES or not p.is_file():
            continue
        if not p.resolve().is_relative_to(inside):
            raise AvatarError(f"{p}: a link to a file outside the avatar folder")
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

    def __init__(self, root: Path | str, rescan_interval_s: float = RESCAN_INTERVAL_S):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._avatars: dict[str, AvatarManifest] = {}
        self.errors: dict[str, str] = {}
        self.rescan_interval_s = rescan_interval_s
        self._last_scan = 0.0
        # folder name -> (stat key, manifest): a rescan re-reads only changed manifests
        self._manifests: dict[str, tuple[tuple[int, ...], AvatarManifest]] = {}
        self.rescan()

    def rescan(self) -> dict[str, AvatarManifest]:
        self._last_scan = time.monotonic()
        found: dict[str, AvatarManifest] = {}
        errors: dict[str, str] = {}
        kept: dict[str, tuple[tuple[int, ...], AvatarManifest]] = {}
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if not (folder / MANIFEST_NAME).is_file():
                    continue
                try:
                    m = self._manifest(folder, kept)
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
            self._manifests = kept
        return found

    def _manifest(
        self, folder: Path, kept: dict[str, tuple[tuple[int, ...], AvatarManifest]]
    ) -> AvatarManifest:
        """`load_manifest(folder)`, reused while neither the manifest nor the folder changed
        (inode, size, mtimes): with 1,000 avatars a rescan is stats, not YAML parses."""
        try:
            st, fst = (folder / MANIFEST_NAME).stat(), folder.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns, fst.st_mtime_ns)
        except OSError:
            return load_manifest(folder)
        cached = self._manifests.get(folder.name)
        m = cached[1] if cached is not None and cached[0] == key else load_manifest(folder)
        kept[folder.name] = (key, m)
        return m

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._avatars)

    def get(self, model_id: str) -> AvatarManifest:
        """The manifest of `model_id`; if unknown, rescans (a new folder may have appeared),
        at most once per `rescan_interval_s` whatever ids are asked for; nothing is kept
        of unknown ids."""
        check_model_id(model_id)
        with self._lock:
            m = self._avatars.get(model_id)
            due = time.monotonic() - self._last_scan >= self.rescan_interval_s
            if m is None and due:
                self._last_scan = time.monotonic()  # one caller rescans
        if m is None and due:
            m = self.rescan().get(model_id)
        if m is None:
            raise UnknownModelError(f"unknown model {model_id!r}")
        return m


# -- image headers: dimensions before decoding -------------------------------------------
def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or WebP header; None if not recognised."""
    b = bytes(data[:64]) if len(data) > 64 else bytes(data)
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return w, h
    if b[:2] == b"BM" and len(b) >= 26:
        w, h = struct.unpack("<ii", b[18:26])
        return abs(w), abs(h)
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP" and len(b) >= 30:
        kind = b[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
        if kind == b"VP8L":
            bits = int.from_bytes(b[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", b[26:30])
            return w & 0x3FFF, h & 0x3FFF
        return None
    if b[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return w, h
        if seg < 2:
            return None
        i += 2 + seg
    return None


def check_frame_header(data: bytes, where: str, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """Raise AvatarError unless `data` is an image whose header says at most
    `max_pixels` pixels (checked before any decoding)."""
    size = image_size(data)
    if size is None:
        raise AvatarError(f"{where}: not a PNG, JPEG, BMP or WebP image")
    w, h = size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise AvatarError(f"{where}: {w}x{h} frame: at most {max_pixels} pixels")


# -- writing a package (the tools, the demo avatar's export, tests and benchmarks) ---------
UNET_FILE = "unet.onnx"
AUDIO_ENCODER_FILE = "audio_encoder.onnx"
FRAMES_DIR = "frames"
CROP_RECTS_FILE = "crop_rects.json"


def write_frames(
    folder: Path | str,
    frames: Iterable[np.ndarray],
    name: str = "{i}.png",
    jpeg_quality: int = 95,
) -> Path:
    """Write BGR uint8 frames into `<folder>/frames/` named by `name` (".png" is
    lossless; ".jpg" at `jpeg_quality`); returns the frames folder."""
    import cv2  # the tools' and services' dependency, not the client's

    out = Path(folder) / FRAMES_DIR
    out.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    for i, frame in enumerate(frames):
        path = out / name.format(i=i)
        if not cv2.imwrite(str(path), frame, params):
            raise AvatarError(f"{path}: could not write the frame")
    return out


def write_crop_rects(folder: Path | str, rects: np.ndarray | list[list[int]]) -> Path:
    """Write `<folder>/crop_rects.json`: one [x1, y1, x2, y2] per frame."""
    path = Path(folder) / CROP_RECTS_FILE
    path.write_text(json.dumps(np.asarray(rects, dtype=np.int64).tolist()) + "\n")
    return path


def write_manifest(
    folder: Path | str,
    name: str,
    *,
    fps: int = 25,
    with_audio_encoder: bool = True,
    header: str = "",
) -> Path:
    """Write `<folder>/avatar.yaml` naming the standard files, atomically; write it last,
    so a scanning service never sees a half-written package. `header`: a comment line."""
    check_model_id(name)
    manifest: dict[str, object] = {"name": name, "fps": fps, "unet": UNET_FILE}
    if with_audio_encoder:
        manifest["audio_encoder"] = AUDIO_ENCODER_FILE
    manifest["frames"] = FRAMES_DIR
    manifest["crop_rects"] = CROP_RECTS_FILE
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(manifest, sort_keys=False)
    folder = Path(folder)
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME
