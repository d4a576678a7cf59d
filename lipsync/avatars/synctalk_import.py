"""Import a trained SyncTalk_2D avatar as an avatar package.

A SyncTalk_2D user has ``dataset/<name>/full_body_img/<i>.jpg`` and
``dataset/<name>/landmarks/<i>.lms`` (frames 0..N-1), the UNet checkpoint
``checkpoint/<name>/<epoch>.pth`` and the shared audio encoder checkpoint.
`import_synctalk` checks the dataset, derives every frame's crop rect by the reference rule
(``x1 = lms[1][0]``, ``y1 = lms[52][1]``, ``x2 = lms[31][0]``, ``y2 = y1 + (x2 - x1)``),
converts the networks (`lipsync.avatars.convert`) and writes ``<out_root>/<name>/`` in the format of
`lipsync.avatars.package`: ``avatar.yaml``, ``unet.onnx``, ``audio_encoder.onnx``,
``frames/<i>.jpg`` and ``crop_rects.json``.

The package is assembled in a hidden temporary folder next to its destination and moved
into place when complete; its ``avatar.yaml`` is written last, so a scanning service never
sees half a package.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.avatars.convert import ConvertReport, convert_checkpoints
from lipsync.avatars.package import (
    AUDIO_ENCODER_FILE,
    FRAMES_DIR,
    UNET_FILE,
    UnknownModelError,
    check_model_id,
    list_frame_files,
    load_crop_rects,
    load_manifest,
    write_crop_rects,
    write_manifest,
)

log = logging.getLogger(__name__)

FPS = 25
# Landmark rows the crop rule reads: x of point 1, y of point 52, x of point 31.
MIN_LANDMARK_ROWS = 53
_INDEX = re.compile(r"0|[1-9][0-9]*")


class DatasetError(ValueError):
    """The SyncTalk_2D dataset or the destination is not usable; the message says why."""


@dataclass
class ImportResult:
    folder: Path
    frames: int
    frame_size: tuple[int, int]  # (width, height) of frame 0
    linked: int  # frames hard-linked (the others were copied)
    convert: ConvertReport


# --------------------------------------------------------------------------------------------
# Dataset reading
# --------------------------------------------------------------------------------------------


def _fmt(indices: list[int], n: int = 10) -> str:
    more = f", ... ({len(indices) - n} more)" if len(indices) > n else ""
    return ", ".join(str(i) for i in indices[:n]) + more


def _indexed_files(folder: Path, suffix: str) -> dict[int, Path]:
    """``{i: folder/<i><suffix>}`` for the canonical numeric names (no leading zeros)."""
    out: dict[int, Path] = {}
    ignored = []
    for p in folder.iterdir():
        if p.suffix != suffix or not p.is_file():
            continue
        if _INDEX.fullmatch(p.stem):
            out[int(p.stem)] = p
        else:
            ignored.append(p.name)
    if ignored:
        log.warning(
            "%s: ignoring %d file(s) not named <i>%s: %s",
            folder,
            len(ignored),
            suffix,
            ", ".join(sorted(ignored)[:5]),
        )
    return out


def read_landmarks(path: Path) -> np.ndarray:
    """Landmarks ``[K, 2]`` int32 of one ``.lms`` file ("x y" per line), parsed as float32
    and cast to int32 (truncation), as the reference does."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable landmarks file: {exc}") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            row = np.array(parts, dtype=np.float32)
        except ValueError:
            raise DatasetError(f"{path} line {n}: expected 'x y', got {line[:60]!r}") from None
        if not np.all(np.isfinite(row)) or np.any(np.abs(row) >= 2**31):
            raise DatasetError(f"{path} line {n}: coordinates out of range: {line[:60]!r}")
        rows.append(row)
    if len(rows) < MIN_LANDMARK_ROWS:
        raise DatasetError(
            f"{path}: {len(rows)} landmark rows, need at least {MIN_LANDMARK_ROWS} "
            "(the crop uses points 1, 31 and 52)"
        )
    return np.array(rows, dtype=np.float32).astype(np.int32)


def crop_rect(lms: np.ndarray) -> tuple[int, int, int, int]:
    """The reference crop rect (x1, y1, x2, y2) of one frame's landmarks."""
    x1, y1, x2 = int(lms[1][0]), int(lms[52][1]), int(lms[31][0])
    return x1, y1, x2, y1 + (x2 - x1)


_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF header without decoding; None if not found."""
    with path.open("rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        while True:
            b = f.read(1)
            while b and b != b"\xff":
                b = f.read(1)
            while b == b"\xff":
                b = f.read(1)
            if not b:
                return None
            marker = b[0]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue  # markers without a length
            if marker in (0xD9, 0xDA):
                return None  # end of image / start of scan before any frame header
            seg = f.read(2)
            if len(seg) < 2:
                return None
            length = int.from_bytes(seg, "big")
            if marker in _SOF_MARKERS:
                data = f.read(5)
                if len(data) < 5:
                    return None
                h, w = int.from_bytes(data[1:3], "big"), int.from_bytes(data[3:5], "big")
                return (w, h) if w > 0 and h > 0 else None
            if length < 2:
                return None
            f.seek(length - 2, os.SEEK_CUR)


def frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a frame: from the JPEG header, else by decoding it with OpenCV."""
    try:
        size = _jpeg_header_size(path)
    except OSError as exc:
        raise DatasetError(f"{path}: unreadable frame: {exc}") from exc
    if size is not None:
        return size
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"{path}: unreadable frame (not an image OpenCV can decode)")
    return int(img.shape[1]), int(img.shape[0])


@dataclass
class SyncTalkDataset:
    frames: list[Path]  # index i -> full_body_img/<i>.jpg
    landmarks: list[Path]  # index i -> landmarks/<i>.lms
    rects: np.ndarray  # [N, 4] int64 (x1, y1, x2, y2)
    sizes: list[tuple[int, int]]  # (width, height) per frame


def read_dataset(dataset: Path) -> SyncTalkDataset:
    """Check a SyncTalk_2D dataset folder and derive the crop rects.

    Frames and landmarks must both be numbered 0..N-1, one to one; every ``.lms`` must have
    at least 53 "x y" rows; every crop rect must be non-empty and lie inside its frame.
    """
    dataset = Path(dataset)
    img_dir, lms_dir = dataset / "full_body_img", dataset / "landmarks"
    for d in (img_dir, lms_dir):
        if not d.is_dir():
            raise DatasetError(f"{dataset}: not a SyncTalk_2D dataset folder ({d.name}/ missing)")
    frames = _indexed_files(img_dir, ".jpg")
    lms = _indexed_files(lms_dir, ".lms")
    if not frames:
        raise DatasetError(f"{img_dir}: no frames named <i>.jpg")
    no_lms = sorted(set(frames) - set(lms))
    no_frame = sorted(set(lms) - set(frames))
    problems = []
    if no_lms:
        problems.append(f"frame(s) without landmarks/<i>.lms: {_fmt(no_lms)}")
    if no_frame:
        problems.append(f"landmarks without full_body_img/<i>.jpg: {_fmt(no_frame)}")
    gaps = sorted(set(range(max(frames) + 1)) - set(frames) - set(no_frame))
    if gaps:
        problems.append(f"frame(s) missing from 0..{max(frames)}: {_fmt(gaps)}")
    if problems:
        raise DatasetError(f"{dataset}: frames and landmarks do not match: " + "; ".join(problems))

    n = len(frames)
    frame_list = [frames[i] for i in range(n)]
    lms_list = [lms[i] for i in range(n)]
    rects = np.zeros((n, 4), dtype=np.int64)
    sizes = []
    for i in range(n):
        x1, y1, x2, y2 = rect = crop_rect(read_landmarks(lms_list[i]))
        w, h = frame_size(frame_list[i])
        sizes.append((w, h))
        where = f"frame {i} ({w}x{h}): crop rect {list(rect)} from {lms_list[i].name}"
        if x2 <= x1:
            raise DatasetError(f"{where} is empty (needs lms[31].x > lms[1].x)")
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise DatasetError(f"{where} does not fit inside the frame")
        rects[i] = rect
    return SyncTalkDataset(frame_list, lms_list, rects, sizes)


# --------------------------------------------------------------------------------------------
# Package writing
# --------------------------------------------------------------------------------------------


def _place_frames(frames: list[Path], dest: Path, link: bool) -> int:
    dest.mkdir()
    linked = 0
    for i, src in enumerate(frames):
        target = dest / f"{i}.jpg"
        if link:
            try:
                os.link(src, target)
                linked += 1
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                log.warning("cannot hard-link %s (%s); copying the frames instead", src, exc)
                link = False
        shutil.copyfile(src, target)
    return linked


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def import_synctalk(
    dataset: Path,
    unet_ckpt: Path,
    audio_encoder_ckpt: Path | None,
    name: str,
    out_root: Path,
    link_frames: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> ImportResult:
    """Import the SyncTalk_2D avatar of `dataset` (the folder holding ``full_body_img/``
    and ``landmarks/``) with its UNet checkpoint (a ``.pth`` file, or the checkpoint folder:
    highest epoch wins) and the audio encoder checkpoint (optional) as the avatar package
    ``<out_root>/<name>/``; returns what was done (`ImportResult.folder` is the package).

    `link_frames` hard-links the frames instead of copying them (copies when the file
    system refuses). An existing non-empty package folder is replaced only with
    `overwrite`. Raises DatasetError (dataset, name, destination), and the errors of
    `lipsync.avatars.convert.convert_checkpoints` (CheckpointError, VerificationError, ...).
    """
    try:
        check_model_id(name)
    except UnknownModelError as exc:
        raise DatasetError(f"avatar name: {exc}") from None
    out_root = Path(out_root)
    final = out_root / name
    if final.exists() and not final.is_dir():
        raise DatasetError(f"{final} exists and is not a folder")
    if _is_nonempty_dir(final) and not overwrite:
        raise DatasetError(f"{final} already exists and is not empty (--overwrite replaces it)")
    for src in (dataset, unet_ckpt, audio_encoder_ckpt):
        if src is not None and Path(src).resolve().is_relative_to(final.resolve()):
            raise DatasetError(f"{src} lies inside the destination {final}; choose another one")

    data = read_dataset(Path(dataset))
    out_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_root))
    old: Path | None = None  # holds the replaced package until the new one is in place
    placed = False
    try:
        report = convert_checkpoints(unet_ckpt, audio_encoder_ckpt, work, verify=verify)
        linked = _place_frames(data.frames, work / FRAMES_DIR, link_frames)
        write_crop_rects(work, data.rects)
        if final.exists():
            if _is_nonempty_dir(final) and not overwrite:  # appeared meanwhile
                raise DatasetError(f"{final} already exists and is not empty")
            old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=out_root))
            os.replace(final, old / name)
        os.replace(work, final)
        placed = True
        write_manifest(
            final,
            name,
            fps=FPS,
            with_audio_encoder=report.audio_encoder_path is not None,
            header="Imported from a SyncTalk_2D avatar by `lipsync-avatar import-synctalk`.",
        )
    except BaseException:
        shutil.rmtree(final if placed else work, ignore_errors=True)
        if old is not None and (old / name).exists() and not final.exists():
            os.replace(old / name, final)  # put the previous package back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # The package must read back as the services read it.
    manifest = load_manifest(final)
    n_files = len(list_frame_files(manifest.frames_dir))
    n_rects = len(load_crop_rects(manifest.crop_rects))
    if n_files != len(data.frames) or n_rects != len(data.frames):
        raise DatasetError(f"{final}: package check failed ({n_files} frames, {n_rects} rects)")
    report.unet_path = final / UNET_FILE
    if report.audio_encoder_path is not None:
        report.audio_encoder_path = final / AUDIO_ENCODER_FILE
    report.files = [final / p.name for p in report.files]
    return ImportResult(final, len(data.frames), data.sizes[0], linked, report)
