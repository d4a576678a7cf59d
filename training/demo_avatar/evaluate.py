"""Lip-sync check of an avatar on held-out speech, through the serving pipeline.

For each clip: reference mel -> mel windows -> ``audio_encoder.onnx`` -> feature blocks
(``lipsync.core``; docs/SEMANTICS.md, "Audio" to "Audio blocks"); background frame of output
frame ``t`` by the services' ping-pong walk; face crop / visual input / paste back
(``lipsync.core.visual``; "Face crop", "Paste-back"); ``unet.onnx`` in onnxruntime (CPU).
Then :func:`lipsync_correlation` compares the mouth opening measured on the composited
frames with the speech envelope.

Timing convention. Output frame ``k`` is shown at ``k / 25`` s (the clip yields ``n + 2``
frames, about its duration times 25). Under the audio-block rule its audio input is rows
``F'[k-8 : k+8]`` = encoder windows ``k-9 .. k+6``; window ``j`` covers mel frames
``3.2 j .. 3.2 j + 15`` (centred mel frame ``t`` is at ``t / 80`` s), so the block spans
``(k - 9) / 25 - 0.005`` .. ``(k + 11) / 25 - 0.0125`` s and its centre (between
windows ``k - 2`` and ``k - 1``) is at ``k / 25 + 0.034`` s, i.e. 0.84 frame after the
frame's own time -- within one frame of it. The demo avatar is trained with the mouth of
frame ``k`` following the speech at ``k / 25`` s, and the envelope here is taken there
(``env_offset_s = 0``).

Run: ``.venv/bin/python -m training.demo_avatar.evaluate`` (held-out clips of
``make_data.py``), or ``--wav assets/speech/demo.wav --save-dir /tmp/demo_preview``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import soundfile as sf

from lipsync.core.mel import melspectrogram
from lipsync.core.visual import face_crop, inner, mouth_to_uint8, paste_back, visual_input
from lipsync.core.windows import clip_frame_count, feature_blocks, mel_windows
from training.demo_avatar.make_data import speech_envelope  # the envelope training used

FPS = 25
SR = 16000
# Inner-mouth region of the demo avatar as fractions of the crop rect (x1, y1, x2, y2).
DEMO_MOUTH_REGION = (0.25, 0.30, 0.75, 0.57)
DARK_THRESHOLD = 70  # grey level (0..255) below which a pixel counts as inner mouth


def mouth_opening(
    frame: np.ndarray,
    rect: Sequence[int],
    region: Sequence[float] = DEMO_MOUTH_REGION,
    dark_threshold: int = DARK_THRESHOLD,
) -> float:
    """Fraction of the pixels of ``region`` (fractions of the crop rect) of a BGR uint8
    frame whose grey level is below ``dark_threshold`` (the dark inner mouth)."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    w, h = x2 - x1, y2 - y1
    fx1, fy1, fx2, fy2 = region
    roi = frame[
        y1 + round(float(fy1 * h)) : y1 + round(float(fy2 * h)),
        x1 + round(float(fx1 * w)) : x1 + round(float(fx2 * w)),
    ]
    grey = cv2.cvtColor(np.ascontiguousarray(roi), cv2.COLOR_BGR2GRAY)
    return float(np.mean(grey < dark_threshold))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def lipsync_correlation(
    frames: Sequence[np.ndarray],
    audio16k: np.ndarray,
    rects: Sequence[Sequence[int]] | np.ndarray,
    region: Sequence[float] = DEMO_MOUTH_REGION,
    *,
    fps: int = FPS,
    lags: Sequence[int] = range(-3, 4),
    dark_threshold: int = DARK_THRESHOLD,
    env_offset_s: float = 0.0,
) -> dict:
    """Pearson correlation between the mouth opening seen in composited frames and the
    speech envelope, at several lags.

    Parameters
    ----------
    frames : sequence of uint8 BGR ``[H, W, 3]``
        Output frames ``k = 0, 1, ...`` of one clip (frame ``k`` shown at ``k / fps`` s).
    audio16k : array ``[N]``
        The clip's audio, mono float at 16 kHz.
    rects : ``[len(frames), 4]``
        Crop rect ``(x1, y1, x2, y2)`` used for each frame (the background frame's rect).
    region : 4 floats
        Inner-mouth measuring box as fractions of the rect's width / height.
    lags : ints
        ``r[lag] = corr(opening[k + lag], envelope[k])``: a positive lag means the mouth
        moves ``lag`` frames after the sound.
    env_offset_s : float
        Envelope of frame ``k`` centred on ``k / fps + env_offset_s`` s.

    Returns
    -------
    dict
        ``r``: {lag: Pearson r}, ``best_lag``, ``r0`` (lag 0), ``opening`` and
        ``envelope`` (float arrays, one value per frame).
    """
    n = len(frames)
    if len(rects) != n:
        raise ValueError(f"{n} frames but {len(rects)} rects")
    opening = np.array(
        [mouth_opening(f, r, region, dark_threshold) for f, r in zip(frames, rects, strict=True)]
    )
    env = speech_envelope(audio16k, n, fps, env_offset_s)
    r = {}
    for lag in lags:
        if lag >= 0:
            a, b = opening[lag:], env[: n - lag]
        else:
            a, b = opening[: n + lag], env[-lag:]
        r[int(lag)] = _pearson(a, b)
    valid = {k: v for k, v in r.items() if np.isfinite(v)}
    best = max(valid, key=valid.get) if valid else None
    return {
        "r": r,
        "best_lag": best,
        "r0": r.get(0, float("nan")),
        "opening": opening,
        "envelope": env,
    }


# ========================================================================================
# Rendering through the serving pipeline
# ========================================================================================


class AvatarRenderer:
    """Renders an avatar folder (``avatar.yaml`` package) for a clip, like the services."""

    def __init__(self, folder: Path | str, threads: int = 2) -> None:
        from lipsync.avatars.package import load_manifest

        m = load_manifest(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        prov = ["CPUExecutionProvider"]
        self.unet = ort.InferenceSession(str(m.unet), opts, providers=prov)
        self.enc = ort.InferenceSession(str(m.audio_encoder), opts, providers=prov)
        self.frames = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in m.frame_files()]
        self.rects = m.load_crop_rects()
        self.crops = [face_crop(f, r) for f, r in zip(self.frames, self.rects, strict=True)]

    def background_index(self, t: int) -> int:
        n = len(self.frames)
        if n == 1:
            return 0
        m = t % (2 * (n - 1))
        return m if m < n else 2 * (n - 1) - m

    def render(self, audio16k: np.ndarray, batch: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
        mel = melspectrogram(audio16k)
        feats = self.enc.run(None, {self.enc.get_inputs()[0].name: mel_windows(mel)})[0]
        n_out = clip_frame_count(mel.shape[0])
        out_frames, rects = [], []
        names = [i.name for i in self.unet.get_inputs()]
        for s in range(0, n_out, batch):
            idx = np.arange(s, min(n_out, s + batch))
            bg = [self.background_index(int(t)) for t in idx]
            vis = visual_input(np.stack([inner(self.crops[b]) for b in bg]))
            aud = feature_blocks(feats, idx)
            pred = self.unet.run(None, {names[0]: vis, names[1]: aud})[0]
            mouths = mouth_to_uint8(pred)
            for b, mu in zip(bg, mouths, strict=True):
                fr = self.frames[b].copy()
                paste_back(fr, self.rects[b], self.crops[b], mu)
                out_frames.append(fr)
                rects.append(self.rects[b])
        return out_frames, np.array(rects)


def _fmt(res: dict) -> str:
    return (
        "  ".join(f"{lag:+d}:{v:.3f}" for lag, v in res["r"].items())
        + f"  best lag {res['best_lag']:+d}"
    )


def main(argv=None) -> None:
    from training.demo_avatar import make_data as md

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--avatar", type=Path, default=md.AVATAR_DIR)
    ap.add_argument("--data-dir", type=Path, default=md.DEFAULT_DATA_DIR)
    ap.add_argument(
        "--wav", type=Path, nargs="*", help="clips to check instead of the held-out set"
    )
    ap.add_argument("--save-dir", type=Path, help="write the most open / closed frames as PNG here")
    args = ap.parse_args(argv)

    rend = AvatarRenderer(args.avatar)
    if args.wav:
        items = [(p.stem, p) for p in args.wav]
    else:
        clips = json.loads((args.data_dir / "clips.json").read_text())
        items = [
            (c["id"], args.data_dir / "speech" / f"{c['id']}.wav")
            for c in clips
            if c["split"].startswith("heldout")
        ]
    all_open, all_env, per = [], [], []
    for name, path in items:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = x.mean(axis=1)
        if sr != SR:
            import librosa

            x = librosa.resample(x, orig_sr=sr, target_sr=SR, res_type="soxr_hq")
        frames, rects = rend.render(x)
        res = lipsync_correlation(frames, x, rects)
        per.append(res["r0"])
        all_open.append(res["opening"])
        all_env.append(res["envelope"])
        print(f"{name:22s} {len(frames):4d} frames  r: {_fmt(res)}", flush=True)
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            order = np.argsort(res["opening"])
            picks = {
                "closed": order[len(order) // 10],
                "open": order[-1],
                "half": order[int(len(order) * 0.75)],
            }
            for tag, k in picks.items():
                cv2.imwrite(str(args.save_dir / f"{name}_{tag}_f{k}.png"), frames[k])
    o, e = np.concatenate(all_open), np.concatenate(all_env)
    pooled = {lag: _pearson(o, e) for lag in [0]}
    print(
        f"mean per-clip r at lag 0: {np.nanmean(per):.3f} (min {np.nanmin(per):.3f}, "
        f"{len(per)} clips); pooled r at lag 0: {pooled[0]:.3f}"
    )


if __name__ == "__main__":
    main()
