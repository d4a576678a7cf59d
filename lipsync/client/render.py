"""Render a speech clip with an avatar through the compositing service into a video with
sound or a folder of JPEGs: what `lipsync-render` and `make demo` do."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.client import (
    SAMPLE_RATE,
    LipsyncClient,
    LipsyncError,
    clip_frames,
    pad_audio,
)
from lipsync.client.media import write_jpeg_folder, write_mp4

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")


class UsageError(ValueError):
    """An argument that cannot be used (e.g. an output path of unknown kind)."""


@dataclass
class RenderSummary:
    """What `render_to` produced."""

    out: Path
    kind: str  # "video" or "frames"
    frames: int
    audio_seconds: float
    render_seconds: float
    padded: bool

    @property
    def video_seconds(self) -> float:
        return self.frames / 25.0

    @property
    def fps(self) -> float:
        return self.frames / self.render_seconds if self.render_seconds > 0 else float("inf")

    def describe(self) -> str:
        what = "video" if self.kind == "video" else "JPEG frames"
        return (
            f"wrote {what} to {self.out}: {self.frames} frames ({self.video_seconds:.2f} s "
            f"at 25 fps) in {self.render_seconds:.2f} s, {self.fps:.1f} frames/s rendered"
        )


def output_kind(out: str | Path) -> str:
    """'video' for .mp4/.mov/.mkv/.m4v, 'frames' for an existing folder or a path ending
    with '/'; raises `UsageError` otherwise."""
    text = str(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "frames"
    if Path(text).suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    raise UsageError(
        f"cannot tell what to write to {text!r}: end it in {', '.join(VIDEO_SUFFIXES)} for a "
        "video, or with '/' for a folder of JPEGs"
    )


def check_model(client: LipsyncClient, model: str) -> None:
    """Raise `LipsyncError` when the service is unreachable or does not know `model`."""
    client.health(timeout_s=min(client.timeout_s, 10.0))
    names = [m.model_id for m in client.list_models()]
    if model not in names:
        have = ", ".join(sorted(names)) or "none"
        raise LipsyncError(f"unknown model {model!r} (the service has: {have})")


def render_to(
    client: LipsyncClient,
    model: str,
    audio16k: np.ndarray,
    out: str | Path,
    *,
    batch_size: int = 24,
    start_frame: int = 0,
    progress: bool = True,
    mode: str = "stream",
) -> RenderSummary:
    """Render `audio16k` with `model` to a video or a JPEG folder (see `output_kind`)."""
    kind = output_kind(out)
    audio_seconds = np.asarray(audio16k).size / SAMPLE_RATE
    audio, padded = pad_audio(np.asarray(audio16k, dtype=np.float32))
    total = clip_frames(audio.size)
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="frame",
        file=sys.stderr,
        disable=not progress,
        desc=model,
        dynamic_ncols=True,
        leave=False,
    )

    def on_progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        frames = client.render(
            model,
            audio,
            batch_size=batch_size,
            start_frame_idx=start_frame,
            on_progress=on_progress,
            mode=mode,
        )
        if kind == "video":
            count = write_mp4(frames, audio, Path(out))
        else:
            count = write_jpeg_folder(frames, Path(out))
    finally:
        bar.close()
    return RenderSummary(Path(out), kind, count, audio_seconds, time.perf_counter() - t0, padded)
