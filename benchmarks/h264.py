"""H.264 streams beside JPEG (docs/DELIVERY.md): what encoding costs and what it saves.

- Cost, one core, per 720p frame, in the order a stream sends them (CPU time of this
  process, which runs them on one thread: the machines are shared, and wall time there
  counts the neighbours' work too): the composited
  frame's H.264 access unit (BGR -> I420 and libx264 at the configured preset, one encoder
  thread) against its JPEG (the compositor's paste + region encode, and a whole-frame
  encode); streams per core at 25 fps = 1000 / (25 x ms per frame). On two frame sets:
  the bench avatar's synthetic 1280x720 frames (camera-like noise in every frame, new
  each frame: the encoder's worst case) and the demo avatar's frames scaled to 1280x720
  (a still portrait: the usual case).
- Quality and size on the demo avatar through both services: assets/speech/demo.wav as a
  JPEG stream and as an H.264 stream at the default bitrate; the mean PSNR of the decoded
  H.264 frames against the JPEG frames, and bytes per frame.

`python -m benchmarks.h264 [--frames 250] [--presets ultrafast,superfast,veryfast]
[--no-services]`; `make bench` runs it inside `benchmarks.run` (the cost part). Writes
out/h264.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks import bench_avatar
from compositing_service.compositor import paste_and_encode
from compositing_service.jpeg import JpegEncoder
from compositing_service.video_encoder import H264Encoder
from lipsync.client.video_out import decode_access_units
from lipsync.config import H264Config, load_config
from lipsync.core.timeline import pingpong
from lipsync.core.visual import face_crop, paste_back

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "avatars" / "demo"
OUT = Path("out")
FPS = 25


def synthetic_frames(n: int = 50) -> tuple[list[np.ndarray], list[list[int]]]:
    return (
        [bench_avatar.make_frame(1280, 720, i) for i in range(n)],
        [bench_avatar.face_rect(1280, 720, i) for i in range(n)],
    )


def demo_frames() -> tuple[list[np.ndarray], list[list[int]]]:
    """The demo avatar's frames scaled to 1280x720, and its crop rects scaled with them."""
    files = sorted(DEMO.joinpath("frames").iterdir(), key=lambda p: int(p.stem))
    rects = json.loads(DEMO.joinpath("crop_rects.json").read_text())
    frames, scaled = [], []
    for f, (x1, y1, x2, y2) in zip(files, rects, strict=True):
        img = cv2.imread(str(f))
        h, w = img.shape[:2]
        frames.append(cv2.resize(img, (1280, 720), interpolation=cv2.INTER_CUBIC))
        sx, sy = 1280 / w, 720 / h
        side = min(int((x2 - x1) * sx), int((y2 - y1) * sy))
        scaled.append([int(x1 * sx), int(y1 * sy), int(x1 * sx) + side, int(y1 * sy) + side])
    return frames, scaled


def composited(
    frames: list[np.ndarray], rects: list[list[int]], n: int
) -> list[tuple[np.ndarray, list[int], np.ndarray, np.ndarray]]:
    """n stream frames in pingpong order: (background, rect, crop, mouth) with a mouth
    that changes every frame (as speech does)."""
    rng = np.random.default_rng(0)
    mouths = [
        cv2.GaussianBlur(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8), (0, 0), 4)
        for _ in range(8)
    ]
    out = []
    for t in range(n):
        i = pingpong(t, len(frames))
        out.append((frames[i], rects[i], face_crop(frames[i], rects[i]), mouths[t % 8]))
    return out


def encode_cost(
    frames: list[np.ndarray], rects: list[list[int]], n: int, h264: H264Config, quality: int
) -> dict[str, float]:
    """ms per frame, one core: H.264 (paste into a copy + encode) and JPEG (paste + region
    encode, as the compositor does; and a whole-frame encode), and bytes per frame."""
    cv2.setNumThreads(1)
    items = composited(frames, rects, n)
    jpeg = JpegEncoder(quality)
    bases = {id(f): jpeg.encode_frame(f) for f in frames}

    def paste(f: np.ndarray, r: list[int], c: np.ndarray, m: np.ndarray) -> np.ndarray:
        out = f.copy()
        paste_back(out, r, c, m)
        return out

    enc = H264Encoder(h264.encoder[0], h264, 1280, 720, FPS)
    first = enc.encode(paste(*items[0]))[0]  # opened, the first keyframe out of the way
    units: list[bytes] = []
    t0 = time.process_time()
    for f, r, c, m in items:
        units.append(enc.encode(paste(f, r, c, m))[0])
    h264_ms = (time.process_time() - t0) * 1e3 / n
    enc.close()

    jpegs: list[bytes] = []
    t0 = time.process_time()
    for f, r, c, m in items:
        jpegs.append(paste_and_encode(jpeg, f, r, c, m, bases[id(f)]))
    jpeg_ms = (time.process_time() - t0) * 1e3 / n

    # quality against the composited pictures themselves (after the timing)
    h264_db, jpeg_db = [], []
    pictures = decode_access_units([first, *units])
    next(pictures)
    for (f, r, c, m), picture, data in zip(items, pictures, jpegs, strict=True):
        source = paste(f, r, c, m)
        h264_db.append(psnr(picture, source))
        jpeg_db.append(psnr(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), source))
    whole = statistics.median(
        _timed(lambda f=f: jpeg.encode(f)) for f, _, _, _ in items[: min(n, 40)]
    )
    return {
        "h264_ms_per_frame": h264_ms,
        "h264_streams_per_core": 1000 / (FPS * h264_ms),
        "h264_bytes_per_frame": sum(map(len, units)) / n,
        "h264_psnr_db": float(np.mean(h264_db)),
        "jpeg_psnr_db": float(np.mean(jpeg_db)),
        "jpeg_region_ms_per_frame": jpeg_ms,
        "jpeg_region_streams_per_core": 1000 / (FPS * jpeg_ms),
        "jpeg_whole_frame_ms": whole * 1e3,
        "jpeg_bytes_per_frame": sum(map(len, jpegs)) / n,
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * float(np.log10(255.0**2 / mse)) if mse else 99.0


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def bench_cost(
    n: int, presets: list[str], h264: H264Config, quality: int
) -> dict[str, dict[str, dict[str, float]]]:
    """encode_cost for each frame set and preset."""
    sets = {"synthetic_720p": synthetic_frames(), "demo_720p": demo_frames()}
    return {
        name: {
            p: encode_cost(f, r, n, dataclasses.replace(h264, preset=p), quality) for p in presets
        }
        for name, (f, r) in sets.items()
    }


def bench_quality(h264: H264Config) -> dict[str, float]:
    """The demo avatar through both services (child processes on free ports): demo.wav as
    a JPEG stream and as an H.264 stream; PSNR of the H.264 frames against the JPEG ones."""
    from lipsync.client import LipsyncClient, load_audio
    from lipsync.local.launch import ServiceProcesses
    from lipsync.local.ports import free_port

    env = dict(os.environ, AVATARS_DIR=str(REPO / "avatars"), LIPSYNC_LOG_LEVEL="WARNING")
    services = ServiceProcesses(
        env=env, inference_port=free_port(), compositing_port=free_port(), quiet=True
    )
    clip, _ = load_audio(REPO / "assets" / "speech" / "demo.wav")
    with services.start(), LipsyncClient(services.address) as client:
        jpeg = list(client.stream("demo", [clip]))
        stream = list(client.stream("demo", [clip], video_codec="h264"))
    pictures = list(decode_access_units(f.h264 for f in stream))
    db = [
        psnr(p, cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR))
        for p, f in zip(pictures, jpeg, strict=True)
    ]
    jpeg_b = sum(len(f.jpeg) for f in jpeg) / len(jpeg)
    h264_b = sum(len(f.h264) for f in stream) / len(stream)
    return {
        "frames": len(stream),
        "size": f"{pictures[0].shape[1]}x{pictures[0].shape[0]}",
        "bitrate_kbps": h264.bitrate_kbps,
        "psnr_mean_db": float(np.mean(db)),
        "psnr_min_db": float(np.min(db)),
        "jpeg_bytes_per_frame": jpeg_b,
        "h264_bytes_per_frame": h264_b,
        "bytes_ratio": h264_b / jpeg_b,
        "keyframes": sum(f.keyframe for f in stream),
    }


def print_report(r: dict) -> None:
    print(f"\n== H.264 beside JPEG, {r['date']} ==\n{r['machine']}")
    h = r["h264"]
    print(
        f"encoder {h['encoder'][0]}, {h['bitrate_kbps']} kbit/s, keyframe every "
        f"{h['keyframe_interval_s']} s, one thread; {r['frames']} frames in stream order\n"
    )
    print("paste + encode per frame, one core; PSNR against the composited frame")
    print(
        "frames           preset     H.264 ms streams/core   bytes  PSNR dB "
        "| JPEG ms streams/core   bytes  PSNR dB"
    )
    for name, by_preset in r["cost"].items():
        for preset, c in by_preset.items():
            print(
                f"  {name:<15}{preset:<10}{c['h264_ms_per_frame']:8.2f} "
                f"{c['h264_streams_per_core']:12.1f} {c['h264_bytes_per_frame']:7.0f} "
                f"{c['h264_psnr_db']:8.2f} | {c['jpeg_region_ms_per_frame']:7.2f} "
                f"{c['jpeg_region_streams_per_core']:12.1f} {c['jpeg_bytes_per_frame']:7.0f} "
                f"{c['jpeg_psnr_db']:8.2f}"
            )
    q = r.get("quality")
    if q:
        print(
            f"\ndemo avatar ({q['size']}, {q['frames']} frames of demo.wav) at "
            f"{q['bitrate_kbps']} kbit/s: PSNR of H.264 vs the JPEG frames mean "
            f"{q['psnr_mean_db']:.2f} dB (min {q['psnr_min_db']:.2f}); bytes per frame "
            f"{q['h264_bytes_per_frame']:.0f} vs {q['jpeg_bytes_per_frame']:.0f} JPEG "
            f"(ratio {q['bytes_ratio']:.3f}); {q['keyframes']} keyframe(s)"
        )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import cpu_name

    ap = argparse.ArgumentParser(prog="benchmarks.h264", description=__doc__)
    ap.add_argument("--frames", type=int, default=250, help="stream frames per measurement")
    ap.add_argument("--presets", default=None, help="libx264 presets (default: the configured)")
    ap.add_argument("--no-services", action="store_true", help="skip the demo-avatar quality")
    ap.add_argument("--out", default=str(OUT / "h264.json"))
    args = ap.parse_args(argv)
    cfg = load_config()
    h264 = cfg.compositing.stream.h264
    presets = args.presets.split(",") if args.presets else [h264.preset]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": " ".join(
            ["python -m benchmarks.h264", *(sys.argv[1:] if argv is None else argv)]
        ),
        "frames": args.frames,
        "h264": dataclasses.asdict(h264),
        "jpeg_quality": cfg.compositing.jpeg_quality,
        "cost": bench_cost(args.frames, presets, h264, cfg.compositing.jpeg_quality),
        "quality": None if args.no_services else bench_quality(h264),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
