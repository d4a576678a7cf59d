"""Render a speech clip with an avatar through the compositing service into a video with
sound or a folder of JPEGs: what `lipsync-render` and `make demo` do."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipsync.client import (
    SAMPLE_RATE,
    LipsyncClient,
    LipsyncError,
    clip_frames,
    pad_audio,
)
from lipsync.client.media import write_jpeg_folder, write_mp4

if TYPE_CHECKING:
    from lipsync.client.video_out import H264Muxer
    from lipsync.client.whip import WhipPublisher

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")
PUSH_SCHEMES = ("rtmp://", "rtmps://", "http://", "https://")  # http(s): WHIP


class UsageError(ValueError):
    """An argument that cannot be used (e.g. an output path of unknown kind)."""


@dataclass
class RenderSummary:
    """What `render_to` produced."""

    out: Path | str  # a file or folder; a push URL when only pushing
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


def check_h264_targets(out: str | Path | None, push: list[str]) -> None:
    """Raise `UsageError` unless `out` (if any) is a video file and each push target an
    rtmp(s):// URL or a WHIP endpoint's http(s):// URL, and there is at least one."""
    if out is None and not push:
        raise UsageError("nothing to write: give --out, --push or both")
    if out is not None and output_kind(out) != "video":
        raise UsageError("--codec h264 writes a video file (.mp4, .mov, .mkv), not frames")
    for url in push:
        if not url.lower().startswith(PUSH_SCHEMES):
            raise UsageError(
                f"--push {url!r}: give an rtmp(s):// URL or a WHIP endpoint's http(s):// URL"
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
    bar = _progress_bar(model, total, progress)

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


def render_h264_to(
    client: LipsyncClient,
    model: str,
    audio16k: np.ndarray,
    out: str | Path | None,
    *,
    push: list[str] | tuple[str, ...] = (),
    start_frame: int = 0,
    progress: bool = True,
) -> RenderSummary:
    """Render `audio16k` as an H.264 stream (StreamStart.video_codec H264) and remux its
    access units, without decoding them, into the video file `out` and/or live to each
    `push` URL (rtmp://..., or a WHIP endpoint's http(s)://... over WebRTC), the frames'
    own audio encoded to AAC (Opus for WHIP). With `push` the stream is a realtime one:
    the service sends the frames at 25 fps, and they go out as they come. A partial file
    is removed on failure."""
    from lipsync.client.video_out import H264Muxer, VideoOutError

    check_h264_targets(out, list(push))
    audio_seconds = np.asarray(audio16k).size / SAMPLE_RATE
    audio, padded = pad_audio(np.asarray(audio16k, dtype=np.float32))
    total = clip_frames(audio.size)
    bar = _progress_bar(model, total, progress)
    targets = ([str(out)] if out is not None else []) + list(push)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    muxers: list[H264Muxer | WhipPublisher] = []
    ok = False
    t0 = time.perf_counter()
    try:
        for t in targets:
            if t.lower().startswith(("http://", "https://")):
                from lipsync.client.whip import WhipPublisher

                muxers.append(WhipPublisher(t, 25.0))
            else:
                muxers.append(H264Muxer(t, 25.0))
        chunks = (audio[i : i + SAMPLE_RATE] for i in range(0, len(audio), SAMPLE_RATE))
        frames = client.stream(
            model,
            chunks,
            start_frame_idx=start_frame,
            realtime=bool(push),
            return_audio=True,
            video_codec="h264",
        )
        count = 0
        for f in frames:
            if not f.h264:
                raise LipsyncError("the service sent a frame without H.264 data")
            for m in muxers:
                m.write(f.index, f.h264, f.keyframe, f.audio)
            count += 1
            bar.update(1)
        for m in muxers:
            m.close()
        ok = True
    except VideoOutError as exc:
        raise LipsyncError(str(exc)) from None
    finally:
        bar.close()
        for m in muxers:
            with contextlib.suppress(Exception):
                m.close()
        if not ok and out is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(out).unlink()
    where: Path | str = Path(out) if out is not None else push[0]
    return RenderSummary(where, "video", count, audio_seconds, time.perf_counter() - t0, padded)


def _progress_bar(model: str, total: int, shown: bool):  # type: ignore[no-untyped-def]
    """A tqdm bar of frames on stderr (the `render` extra), gone when done."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="frame",
        file=sys.stderr,
        disable=not shown,
        desc=model,
        dynamic_ncols=True,
        leave=False,
    )
