"""`lipsync-render`: render a speech clip with an avatar through the compositing service.

    lipsync-render --model NAME --audio FILE --out OUT [--server HOST:PORT]
                   [--batch-size 24] [--start-frame 0] [--quiet]

OUT ending in .mp4, .mov, .mkv or .m4v gets a video with sound (H.264 + AAC, 25 fps);
OUT that is an existing folder or ends with '/' gets one JPEG per frame (000000.jpg, ...).
Expected errors (service unreachable, unknown model, unreadable audio, ffmpeg failure)
print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync.client import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    LipsyncClient,
    LipsyncError,
    clip_frames,
    load_audio,
    pad_audio,
)
from lipsync.media import MediaError, write_jpeg_folder, write_mp4

PROG = "lipsync-render"
EXIT_ERROR = 2
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")
DEFAULT_SERVER = os.environ.get("COMPOSITING_ADDRESS", "localhost:50052")


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render a speech clip with a lip-sync avatar: an MP4 with sound, or a "
        "folder of JPEG frames.",
    )
    p.add_argument("--model", required=True, help="avatar name (see ListModels)")
    p.add_argument(
        "--audio",
        required=True,
        type=Path,
        help="speech file: wav, flac, ogg, mp3 (any rate, mono or stereo)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="OUT.mp4 / .mov / .mkv for a video, or a folder (existing, or ending "
        "with '/') for JPEG frames",
    )
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help="compositing service address (default: $COMPOSITING_ADDRESS or %(default)s)",
    )
    p.add_argument(
        "--mode",
        choices=["stream", "batch"],
        default="stream",
        help="stream: one StreamComposite session (default); batch: InferBatchComposite requests",
    )
    p.add_argument(
        "--batch-size", type=int, default=24, help="frames per request in batch mode (default 24)"
    )
    p.add_argument(
        "--start-frame",
        type=int,
        default=0,
        help="background frame of the first video frame (default 0)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for one request (default 120)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print(f"{PROG}: error: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    try:
        output_kind(args.out)
        audio, seconds = load_audio(args.audio)
        if audio.size < MIN_SAMPLES:
            print(
                f"{PROG}: note: the audio lasts {seconds:.3f} s, less than "
                f"{MIN_SAMPLES / SAMPLE_RATE:.4f} s: padded with silence",
                file=sys.stderr,
            )
        with LipsyncClient(args.server, timeout_s=args.timeout) as client:
            check_model(client, args.model)
            summary = render_to(
                client,
                args.model,
                audio,
                args.out,
                batch_size=args.batch_size,
                mode=args.mode,
                start_frame=args.start_frame,
                progress=not args.quiet,
            )
    except (LipsyncError, MediaError, UsageError, OSError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
