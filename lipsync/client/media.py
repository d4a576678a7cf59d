"""Writing rendered frames: MP4 (H.264 + AAC) through ffmpeg, or a folder of JPEGs.

The ffmpeg binary is the one shipped by `imageio-ffmpeg` (`pip install
lipsync-serving[render]`); it has no ffprobe, so `probe` parses `ffmpeg -i` and counts
frames with a stream-copy pass to the null muxer.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.core.audio import to_int16

__all__ = ["MediaError", "ffmpeg_exe", "probe", "write_jpeg_folder", "write_mp4"]

AUDIO_RATE = 16000
STDERR_TAIL_LINES = 20
# Every ffmpeg run that writes: quiet but for errors, no stdin prompts, overwrite.
_WRITE_FLAGS = ["-hide_banner", "-nostdin", "-loglevel", "error", "-y"]


class MediaError(RuntimeError):
    """ffmpeg is missing or failed (the message ends with its stderr tail)."""


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary of imageio-ffmpeg (or $IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise MediaError(
            "writing MP4 needs imageio-ffmpeg: pip install 'lipsync-serving[render]'"
        ) from exc
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise MediaError(f"no ffmpeg binary: {exc}") from exc


def _write_wav16(path: Path, audio16k: np.ndarray, n_samples: int) -> None:
    """`audio16k` as 16-bit PCM wav, cut or zero-padded to exactly `n_samples`."""
    import soundfile as sf

    x = to_int16(audio16k)
    fitted = np.zeros(n_samples, dtype=np.int16)
    m = min(n_samples, x.size)
    fitted[:m] = x[:m]
    sf.write(str(path), fitted, AUDIO_RATE, subtype="PCM_16")


def encode_command(
    ffmpeg: str, video: Path, fps: int = 25, crf: int = 18, preset: str = "veryfast"
) -> list[str]:
    """Step 1 of `write_mp4`: JPEGs on stdin to an H.264 stream in `video` (no audio)."""
    return [
        ffmpeg,
        *_WRITE_FLAGS,
        # concatenated JPEGs on stdin, one per frame at `fps`
        "-f",
        "image2pipe",
        "-framerate",
        str(fps),
        "-c:v",
        "mjpeg",
        "-i",
        "pipe:0",
        # even dimensions for yuv420p (odd ones padded with a black row/column), and
        # limited-range yuv420p rather than the JPEGs' full-range yuvj420p
        "-vf",
        "pad=ceil(iw/2)*2:ceil(ih/2)*2,scale=in_range=pc:out_range=tv,format=yuv420p",
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        str(crf),
        "-pix_fmt",
        "yuv420p",
        "-r",
        str(fps),
        "-an",
        str(video),
    ]


def mux_command(ffmpeg: str, video: Path, wav: Path, out: Path) -> list[str]:
    """Step 2 of `write_mp4`: the H.264 stream copied, the wav (already cut to the video's
    length) encoded to AAC."""
    cmd = [
        ffmpeg,
        *_WRITE_FLAGS,
        "-i",
        str(video),
        "-i",
        str(wav),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c:v",
        "copy",
        "-c:a",
        "aac",
        "-b:a",
        "96k",
    ]
    if out.suffix.lower() in (".mp4", ".mov", ".m4v"):
        cmd += ["-movflags", "+faststart"]
    return [*cmd, str(out)]


def _tail(lines: Iterable[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines if line.strip())
    return text or "(no output)"


def _encode_video(cmd: list[str], jpeg_frames: Iterable[bytes]) -> int:
    """Pipe the frames into ffmpeg; returns how many. ffmpeg is stopped if the iterable
    raises."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stderr is not None
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    stderr = proc.stderr
    reader = threading.Thread(
        target=lambda: tail.extend(b.decode("utf-8", "replace") for b in stderr),
        name="ffmpeg-stderr",
        daemon=True,
    )
    reader.start()
    count = 0
    try:
        try:
            for jpeg in jpeg_frames:
                proc.stdin.write(jpeg)
                count += 1
        except BrokenPipeError:
            pass  # ffmpeg exited early: its exit code and stderr say why
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        rc = proc.wait()
        reader.join(5)
        if count == 0:
            raise MediaError("no frames to write")
        if rc != 0:
            raise MediaError(f"ffmpeg failed (exit code {rc}): {_tail(tail)}")
        return count
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()


def write_mp4(
    jpeg_frames: Iterable[bytes],
    audio16k: np.ndarray,
    out: Path | str,
    fps: int = 25,
    *,
    crf: int = 18,
    preset: str = "veryfast",
) -> int:
    """Encode JPEG frames and 16 kHz mono audio into an H.264 + AAC video at `out`.

    The frames are piped into ffmpeg as they come (the iterable may be a live render) and
    encoded to a temporary H.264 stream; then the audio, cut or padded with silence to
    exactly `frames / fps` seconds, is encoded to AAC and muxed with that stream copied.
    So the video lasts `frames / fps` (for .mp4/.mov to the millisecond; .mkv carries up
    to one AAC frame, 64 ms, more). Odd frame sizes are padded to even ones. Returns the
    number of frames written. On failure the partial file is removed and `MediaError`
    raised with ffmpeg's stderr tail; an exception raised by the iterable stops ffmpeg
    and propagates.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg = ffmpeg_exe()
    ok = False
    try:
        with tempfile.TemporaryDirectory(prefix="lipsync-mp4-") as tmp:
            video, wav = Path(tmp) / "video.mp4", Path(tmp) / "audio.wav"
            count = _encode_video(encode_command(ffmpeg, video, fps, crf, preset), jpeg_frames)
            _write_wav16(wav, audio16k, count * AUDIO_RATE // fps)
            run = _run(mux_command(ffmpeg, video, wav, out))
            if run.returncode != 0:
                raise MediaError(
                    f"ffmpeg failed (exit code {run.returncode}): "
                    f"{_tail(run.stderr.splitlines()[-STDERR_TAIL_LINES:])}"
                )
        ok = True
        return count
    finally:
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()


def write_jpeg_folder(frames: Iterable[bytes], folder: Path | str) -> int:
    """Write frames as `000000.jpg`, `000001.jpg`, ... into `folder` (created if needed).

    Returns the number of frames written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, jpeg in enumerate(frames):
        (folder / f"{i:06d}.jpg").write_bytes(jpeg)
        count = i + 1
    return count


# -- probing ------------------------------------------------------------------------------
_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM = re.compile(r"^\s*Stream #\d+:(\d+)[^:]*:\s*(Video|Audio|Subtitle|Data):\s*([\w-]+)(.*)$")
_FPS = re.compile(r"([\d.]+)\s*fps")
_SIZE = re.compile(r",\s*(\d{2,5})x(\d{2,5})")
_RATE = re.compile(r"(\d+)\s*Hz")
_PROGRESS_FRAME = re.compile(r"^frame=(\d+)\s*$", re.MULTILINE)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)


def probe(path: Path | str) -> dict[str, Any]:
    """Describe a media file with ffmpeg.

    Returns ``{"duration": s, "streams": [{"index", "type", "codec", ...}], "video_codec",
    "audio_codec", "width", "height", "fps", "frames"}`` where `frames` counts the first
    video stream's packets (one per frame) and the video keys are None without video.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"no such file: {path}")
    ffmpeg = ffmpeg_exe()
    info = _run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)]).stderr
    streams: list[dict[str, Any]] = []
    for line in info.splitlines():
        m = _STREAM.match(line)
        if not m:
            continue
        s: dict[str, Any] = {
            "index": int(m.group(1)),
            "type": m.group(2).lower(),
            "codec": m.group(3),
        }
        rest = m.group(4)
        if s["type"] == "video":
            if size := _SIZE.search(rest):
                s["width"], s["height"] = int(size.group(1)), int(size.group(2))
            if fps := _FPS.search(rest):
                s["fps"] = float(fps.group(1))
        elif s["type"] == "audio" and (rate := _RATE.search(rest)):
            s["sample_rate"] = int(rate.group(1))
        streams.append(s)
    if not streams:
        raise MediaError(f"ffmpeg cannot read {path}: {_tail(info.splitlines()[-5:])}")
    d = _DURATION.search(info)
    duration = int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3)) if d else None
    video = next((s for s in streams if s["type"] == "video"), None)
    audio = next((s for s in streams if s["type"] == "audio"), None)
    frames = None
    if video is not None:
        run = _run(
            [
                ffmpeg,
                "-hide_banner",
                "-nostdin",
                "-nostats",
                "-i",
                str(path),
                "-map",
                "0:v:0",
                "-c",
                "copy",
                "-f",
                "null",
                "-progress",
                "pipe:1",
                os.devnull,
            ]
        )
        counts = _PROGRESS_FRAME.findall(run.stdout)
        frames = int(counts[-1]) if counts else None
    get: Callable[[str], Any] = lambda k: video.get(k) if video else None  # noqa: E731
    return {
        "duration": duration,
        "streams": streams,
        "video_codec": video["codec"] if video else None,
        "audio_codec": audio["codec"] if audio else None,
        "audio_sample_rate": audio.get("sample_rate") if audio else None,
        "width": get("width"),
        "height": get("height"),
        "fps": get("fps"),
        "frames": frames,
    }
