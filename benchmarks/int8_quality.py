"""Quality of the int8 UNet (issue 20): served mouths of the int8 model against the float32
model's, on the demo avatar and on the bench avatar (the reference-size network, random
weights), and the demo avatar's mouth/speech correlation with each.

For each avatar, a copy of its package is quantized (`lipsync-avatar quantize`'s code,
lipsync.avatars.quantize.build), then the inference engine (the service's pipeline, CPU) serves a
clip twice, `inference.cpu_precision` float32 and int8, every frame of the clip on the
avatar's own crops (ping-pong background frames, as the compositing service walks them).
Mouth-region PSNR per frame, as the uint8 pixels served (lipsync.avatars.quantize.mouth_psnr).
The demo avatar's correlation: training/demo_avatar/evaluate.py's lipsync_correlation on
the composited frames of each.

    .venv/bin/python -m benchmarks.int8_quality [--avatars demo,bench] [--wav WAV]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import soundfile as sf

from benchmarks import bench_avatar
from benchmarks.run import cpu_name
from inference_service.engine import EngineRequest, InferenceEngine
from lipsync.avatars.package import load_manifest
from lipsync.avatars.quantize import QualityBounds, mouth_psnr_u8
from lipsync.avatars.quantize.build import QuantizeOptions, describe, quantize_avatar
from lipsync.config import load_config
from lipsync.core import audio, windows
from lipsync.core.visual import face_crop, inner, mouth_to_uint8, paste_back

REPO = Path(__file__).resolve().parents[1]
DEMO_WAV = REPO / "assets" / "speech" / "demo.wav"
OUT = Path("out")


def load_wav(path: Path) -> np.ndarray:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != audio.SAMPLE_RATE:
        import librosa

        x = librosa.resample(x, orig_sr=sr, target_sr=audio.SAMPLE_RATE, res_type="soxr_hq")
    return np.ascontiguousarray(x, np.float32)


def pingpong(t: int, n: int) -> int:
    if n == 1:
        return 0
    m = t % (2 * (n - 1))
    return m if m < n else 2 * (n - 1) - m


def serve_clip(root: Path, model_id: str, precision: str, clip: np.ndarray, batch: int = 8):  # type: ignore[no-untyped-def]
    """(mouths uint8 [N,320,320,3], composited frames, rects, provider, precision served)
    of every frame of `clip` through the inference engine at `precision`."""
    cfg = load_config(env={})
    cfg.avatars_dir = str(root)
    cfg.inference.execution_providers = ["cpu"]
    cfg.inference.cpu_precision = precision
    cfg.inference.intra_op_threads = os.cpu_count() or 1
    engine = InferenceEngine(cfg)
    try:
        nets = engine.registry.get(model_id)
        m = load_manifest(root / model_id)
        frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in m.frame_files()]
        rects = m.load_crop_rects()
        crops = [face_crop(f, r) for f, r in zip(frames, rects, strict=False)]
        n = windows.clip_frame_count(1 + len(clip) // audio.HOP)
        mouths, out_frames, out_rects = [], [], []
        for s in range(0, n, batch):
            idx = list(range(s, min(n, s + batch)))
            bg = [pingpong(t, len(frames)) for t in idx]
            res = engine.infer(
                EngineRequest(
                    model_id,
                    len(idx),
                    face_crops=np.stack([inner(crops[b]) for b in bg]),
                    clip=clip,
                    clip_frame_offset=s,
                )
            )
            mu = mouth_to_uint8(res.mouths)
            mouths.append(mu)
            for b, mouth in zip(bg, mu, strict=True):
                fr = frames[b].copy()
                paste_back(fr, rects[b], crops[b], mouth)
                out_frames.append(fr)
                out_rects.append(rects[b])
        return np.concatenate(mouths), out_frames, np.array(out_rects), nets
    finally:
        engine.close()


def measure(folder: Path, opts: QuantizeOptions, clip: np.ndarray, correlation: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="int8q-") as tmp:
        root = Path(tmp)
        dst = root / folder.name
        shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("unet.int8*"))
        model_id = load_manifest(dst).name
        t0 = time.perf_counter()
        report = quantize_avatar(dst, opts)
        quantize_s = time.perf_counter() - t0
        print(describe(report))
        if report.int8_path is None:
            return {"model_id": model_id, "quantize_check": report.check.to_dict(), "served": None}
        ref, ref_frames, rects, _ = serve_clip(root, model_id, "float32", clip)
        got, got_frames, _, nets = serve_clip(root, model_id, "int8", clip)
        psnr = mouth_psnr_u8(ref, got)
        out = {
            "model_id": model_id,
            "quantize_seconds": quantize_s,
            "record": json.loads(report.record.to_json()),
            "served_precision": nets.precision,
            "served_note": nets.precision_note,
            "frames": len(psnr),
            "mouth_psnr_mean_db": float(psnr.mean()),
            "mouth_psnr_worst_db": float(psnr.min()),
            "mouth_psnr_p5_db": float(np.percentile(psnr, 5)),
            "float_mb": report.float_bytes / 2**20,
            "int8_mb": report.int8_bytes / 2**20,
        }
        if correlation:
            from training.demo_avatar.evaluate import lipsync_correlation

            r_f = lipsync_correlation(ref_frames, clip, rects)["r0"]
            r_q = lipsync_correlation(got_frames, clip, rects)["r0"]
            out.update(correlation_float32=r_f, correlation_int8=r_q, correlation_ratio=r_q / r_f)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.int8_quality", description=__doc__)
    ap.add_argument("--avatars", default="demo,bench", help="demo and/or bench")
    ap.add_argument("--wav", type=Path, default=DEMO_WAV, help="the clip served")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--activation-type", default="quint8", choices=("quint8", "qint8"))
    ap.add_argument("--keep-float", default="")
    ap.add_argument("--out", default=str(OUT / "int8_quality.json"))
    args = ap.parse_args(argv)
    clip = load_wav(args.wav)
    opts = QuantizeOptions(
        samples=args.samples,
        activation_type=args.activation_type,
        keep_float=tuple(k for k in args.keep_float.split(",") if k),
        bounds=QualityBounds(),
    )
    results = {}
    for name in args.avatars.split(","):
        if name == "demo":
            folder, corr = REPO / "avatars" / "demo", True
        elif name == "bench":
            folder, corr = bench_avatar.build(OUT / "bench" / "avatars"), False
        else:
            raise SystemExit(f"unknown avatar {name!r}: demo or bench")
        print(f"== {name}: quantizing a copy of {folder}, serving {args.wav.name} ...", flush=True)
        results[name] = measure(folder, opts, clip, corr)
        r = results[name]
        if "frames" not in r:
            print(f"{name}: the int8 model failed its check at quantize time")
            continue
        print(
            f"{name}: served {r['served_precision']}; {r['frames']} frames; mouth-region "
            f"PSNR int8 vs float32: mean {r['mouth_psnr_mean_db']:.2f} dB, worst "
            f"{r['mouth_psnr_worst_db']:.2f} dB; model {r['float_mb']:.2f} -> "
            f"{r['int8_mb']:.2f} MiB"
        )
        if corr:
            print(
                f"{name}: mouth/speech correlation r0 float32 {r['correlation_float32']:.3f}, "
                f"int8 {r['correlation_int8']:.3f} (ratio {r['correlation_ratio']:.3f})"
            )
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.int8_quality " + " ".join(argv or []),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores; onnxruntime {ort.__version__}",
        "clip": str(args.wav.name),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
