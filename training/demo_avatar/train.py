"""Train the `demo` avatar's audio encoder + UNet end to end, on CPU, deterministically.

Data (from ``make_data.py``): espeak-ng clips and the cache of 320x320 network squares of
every background frame with the mouth opened to 16 levels. One training sample is
(clip c, output frame i, background frame k):

* audio: the clip's reference mel (``inference_service.audio.melspectrogram``; a gain /
  noise augmented copy of the clip for 2 of its 3 variants), the mel windows of the 16
  feature rows frame ``i`` takes (docs/SEMANTICS.md, "Audio blocks"), run through the encoder
  being trained and gathered into the ``[32, 16, 16]`` block by :func:`gather_blocks`
  (differentiable; checked against ``feature_blocks`` by ``--check``);
* visual input: ``[real, masked]`` of background frame ``k`` ("Face crop" in
  docs/SEMANTICS.md) whose mouth is closed (75 %) or at a random opening (25 %), so the
  mouth must come from the audio;
* target: background frame ``k`` with the mouth at ``opening(i / 25 s)`` of the clip.

Loss: L1 over the 320x320 output, x10 inside the region the mouth and jaw ever change,
plus an auxiliary MSE of an opening read off the audio embedding (training-only head),
on the image batch and on a cheap audio-only batch of 2 x 32 consecutive frames per step.

Run: ``.venv/bin/python -m training.demo_avatar.train`` (writes ``<data-dir>/model.pt``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from lipsync.core.mel import melspectrogram
from lipsync.core.windows import clip_frame_count, feature_blocks, mel_window_starts, mel_windows
from training.demo_avatar import make_data as md

SEED = 1234
MASK_Y0, MASK_Y1, MASK_X0, MASK_X1 = 5, 310, 5, 315  # "Face crop", half-open


# ========================================================================================
# Networks (the ONNX contract of docs/SEMANTICS.md "Tensors", much narrower inside)
# ========================================================================================


class AudioEncoder(nn.Module):
    """mel window ``[B, 1, 80, 16]`` -> ``[B, 512]``."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, (2, 1), 1),
            nn.LeakyReLU(0.1),  # 40 x 16
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.LeakyReLU(0.1),  # 20 x 8
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.LeakyReLU(0.1),  # 10 x 4
            nn.Conv2d(64, 128, 3, 2, 1),
            nn.LeakyReLU(0.1),  # 5 x 2
        )
        self.fc = nn.Linear(128 * 5 * 2, 512)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.convs(mel).flatten(1)))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.1))


def _sep(cin: int, cout: int) -> nn.Sequential:
    """1x1 then depthwise 3x3 (cheap at high resolution)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(cout, cout, 3, 1, 1, groups=cout),
        nn.LeakyReLU(0.1),
    )


class DemoUNet(nn.Module):
    """``input [B, 6, 320, 320]``, ``audio [B, 32, 16, 16]`` -> ``[B, 3, 320, 320]`` in [0, 1].

    A small U-Net at half resolution predicts a residual over the real input square,
    upsampled bilinearly from 160x160: ``output = clamp(real + residual, 0, 1)``, so the
    face keeps the input's own pixels wherever the residual is ~0 (everything the mouth
    does not touch; an L1 loss drives it there). The 160x160 generation is finer than the
    demo's frames (its crop rect is ~132 px wide). ``+ 0.5 / 255`` before the clamp makes
    the services' truncating uint8 conversion round to nearest. (A sigmoid blend of a
    generated colour over the input trained far slower: stuck copying the input.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.e1 = _conv(6, 16)  # 160
        self.e2 = _conv(16, 32, 2)  # 80
        self.e3 = _conv(32, 48, 2)  # 40
        self.e4 = _conv(48, 64, 2)  # 20
        self.e5 = _conv(64, 96, 2)  # 10
        # audio: [16 rows, 512] -> temporal convs -> embedding
        self.a1 = nn.Conv1d(512, 128, 3, 1, 1)
        self.a2 = nn.Conv1d(128, 128, 3, 2, 1)
        self.a3 = nn.Linear(128 * 8, 128)
        self.film = nn.Linear(128, 2 * (96 + 64 + 48 + 32))
        self.b1 = _conv(96 + 128, 96)
        self.b2 = _conv(96, 96)
        self.d4 = _conv(96 + 64, 64)  # 20
        self.d3 = _conv(64 + 48, 48)  # 40
        self.d2 = _sep(48 + 32, 32)  # 80
        self.d1 = _sep(32 + 16, 24)  # 160
        self.head = nn.Conv2d(24, 3, 3, 1, 1)
        self.aux = nn.Linear(128, 1)  # training only: mouth opening from the audio
        with torch.no_grad():  # start close to copying the input
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    def audio_embedding(self, audio: torch.Tensor) -> torch.Tensor:
        a = audio.reshape(-1, 16, 512).transpose(1, 2)  # rows back out of [32, 16, 16]
        a = F.leaky_relu(self.a1(a), 0.1)
        a = F.leaky_relu(self.a2(a), 0.1)
        return F.leaky_relu(self.a3(a.flatten(1)), 0.1)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward_with_aux(self, x: torch.Tensor, audio: torch.Tensor):
        real = x[:, :3]
        h = F.avg_pool2d(x, 2)
        e1 = self.e1(h)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        e4 = self.e4(e3)
        e5 = self.e5(e4)
        emb = self.audio_embedding(audio)
        g = self.film(emb)
        g5, b5, g4, b4, g3, b3, g2, b2 = torch.split(g, [96, 96, 64, 64, 48, 48, 32, 32], dim=1)
        embmap = emb[:, :, None, None].expand(-1, -1, e5.shape[2], e5.shape[3])
        b = self.b1(torch.cat([e5, embmap], 1))
        b = self.b2(b) * (1 + g5[:, :, None, None]) + b5[:, :, None, None]
        d = (
            self.d4(torch.cat([self._up(b), e4], 1)) * (1 + g4[:, :, None, None])
            + b4[:, :, None, None]
        )
        d = (
            self.d3(torch.cat([self._up(d), e3], 1)) * (1 + g3[:, :, None, None])
            + b3[:, :, None, None]
        )
        d = (
            self.d2(torch.cat([self._up(d), e2], 1)) * (1 + g2[:, :, None, None])
            + b2[:, :, None, None]
        )
        d = self.d1(torch.cat([self._up(d), e1], 1))
        out = real + self._up(self.head(d))
        out = torch.clamp(out + 0.5 / 255.0, 0.0, 1.0)
        return out, self.aux(emb)[:, 0]

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x, audio)[0]


# ========================================================================================
# Section-2 block gather in torch
# ========================================================================================


def block_rows(n: int, frame_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For output frames ``i`` of a clip with ``n`` encoder windows: the window index of
    each of the 16 rows ``F'[i-8 : i+8]`` (``[B, 16]`` int64) and whether the row exists
    (``[B, 16]`` bool; rows outside ``[0, n+2)`` are zeros). ``F'[r] = F[clip(r-1, 0, n-1)]``.
    """
    r = np.asarray(frame_indices, np.int64)[:, None] + np.arange(-8, 8)
    valid = (r >= 0) & (r < n + 2)
    return np.clip(r - 1, 0, n - 1), valid


def gather_blocks(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Encoder outputs of the rows, ``[B * 16, 512]`` in row order, and their validity
    ``[B, 16]`` -> the UNet audio input ``[B, 32, 16, 16]`` (row-major reshape)."""
    b = valid.shape[0]
    f = features.reshape(b, 16, 512) * valid[:, :, None].to(features.dtype)
    return f.reshape(b, 32, 16, 16)


def blocks_for_clip(encoder: AudioEncoder, mel: np.ndarray, frame_indices) -> torch.Tensor:
    """Differentiable audio input of some output frames of a clip (mel ``[T, 80]``)."""
    starts = mel_window_starts(mel.shape[0])
    rows, valid = block_rows(len(starts), np.asarray(frame_indices))
    s = starts[rows.reshape(-1)]
    win = mel[s[:, None] + np.arange(16)].transpose(0, 2, 1)[:, None]  # [B*16, 1, 80, 16]
    feats = encoder(torch.from_numpy(np.ascontiguousarray(win, dtype=np.float32)))
    return gather_blocks(feats, torch.from_numpy(valid))


def check_gather(encoder: AudioEncoder, wav: np.ndarray) -> float:
    """Max |torch gather - inference_service.audio.feature_blocks| on one clip."""
    mel = melspectrogram(wav)
    with torch.no_grad():
        f = encoder(torch.from_numpy(mel_windows(mel))).numpy()
        n_out = clip_frame_count(mel.shape[0])
        idx = np.arange(-3, n_out + 12)  # includes frames before 0 and past the end
        ref = feature_blocks(f, idx)
        got = blocks_for_clip(encoder, mel, idx).numpy()
    return float(np.abs(ref - got).max())


# ========================================================================================
# Data
# ========================================================================================


def load_clips(data_dir: Path, split: str, rng: np.random.Generator, variants: int = 3):
    """Per clip: list of mel variants (clean, gain+noise, gain) and per-frame openings."""
    clips = [c for c in json.loads((data_dir / "clips.json").read_text()) if c["split"] == split]
    out = []
    for c in clips:
        x, _ = sf.read(data_dir / "speech" / f"{c['id']}.wav", dtype="float32")
        mels = [melspectrogram(x)]
        for v in range(1, variants):
            g = 10 ** (rng.uniform(-8, 4) / 20)
            y = x * g
            if v == 1:
                y = y + rng.standard_normal(len(y)).astype(np.float32) * 10 ** (
                    rng.uniform(-70, -45) / 20
                )
            mels.append(melspectrogram(y))
        n_out = clip_frame_count(mels[0].shape[0])
        env = md.speech_envelope(x, n_out)
        out.append(
            dict(id=c["id"], mels=mels, opening=md.opening_from_envelope(env).astype(np.float32))
        )
    return out


def masked_input(real_u8: np.ndarray) -> torch.Tensor:
    """``[B, 320, 320, 3]`` uint8 -> ``[B, 6, 320, 320]`` float32 ("Face crop")."""
    real = torch.from_numpy(real_u8).permute(0, 3, 1, 2).float() / 255.0
    masked = real.clone()
    masked[:, :, MASK_Y0:MASK_Y1, MASK_X0:MASK_X1] = 0
    return torch.cat([real, masked], 1)


def loss_weight(cache: np.ndarray) -> torch.Tensor:
    """1 everywhere, 10 where any opening changes any background frame (dilated)."""
    import cv2

    diff = np.zeros((320, 320), bool)
    for k in range(0, cache.shape[0], 7):
        d = np.abs(cache[k, -1].astype(np.int16) - cache[k, 0]).max(-1) > 6
        diff |= d
    m = cv2.dilate(diff.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    return torch.from_numpy(1.0 + 9.0 * m.astype(np.float32))[None, None]


def make_batch(encoder, clips, cache, rng, batch):
    levels = cache.shape[1]
    real_idx, tgt_idx, mels, frames, opens = [], [], [], [], []
    for _ in range(batch):
        c = clips[int(rng.integers(len(clips)))]
        n_out = len(c["opening"])
        i = int(rng.integers(n_out))
        k = int(rng.integers(cache.shape[0]))
        o = float(c["opening"][i])
        lv = round(float(o * (levels - 1)))
        rl = 0 if rng.random() < 0.75 else int(rng.integers(levels))
        real_idx.append((k, rl))
        tgt_idx.append((k, lv))
        mels.append(c["mels"][int(rng.integers(len(c["mels"])))])
        frames.append(i)
        opens.append(o)
    real = np.stack([cache[k, lv] for k, lv in real_idx])
    tgt = np.stack([cache[k, lv] for k, lv in tgt_idx])
    audio = torch.cat([blocks_for_clip(encoder, m, [i]) for m, i in zip(mels, frames, strict=True)])
    x = masked_input(real)
    y = torch.from_numpy(tgt).permute(0, 3, 1, 2).float() / 255.0
    return x, audio, y, torch.tensor(opens)


def aux_batch(encoder, model, clips, rng, n_clips=2, run=32):
    """Cheap audio-only batch: ``run`` consecutive frames of ``n_clips`` clips, encoder run
    once per window; returns (predicted opening, target opening)."""
    preds, tgts = [], []
    for _ in range(n_clips):
        c = clips[int(rng.integers(len(clips)))]
        n_out = len(c["opening"])
        s = int(rng.integers(max(1, n_out - run + 1)))
        idx = np.arange(s, min(n_out, s + run))
        mel = c["mels"][int(rng.integers(len(c["mels"])))]
        starts = mel_window_starts(mel.shape[0])
        rows, valid = block_rows(len(starts), idx)
        used = np.unique(rows)
        win = mel[starts[used][:, None] + np.arange(16)].transpose(0, 2, 1)[:, None]
        f = encoder(torch.from_numpy(np.ascontiguousarray(win, dtype=np.float32)))
        pos = torch.from_numpy(np.searchsorted(used, rows.reshape(-1)))
        audio = gather_blocks(f[pos], torch.from_numpy(valid))
        preds.append(model.aux(model.audio_embedding(audio))[:, 0])
        tgts.append(torch.from_numpy(c["opening"][idx]))
    return torch.cat(preds), torch.cat(tgts)


def heldout_opening_corr(model, encoder, clips) -> float:
    """Correlation of the aux opening read off the audio with the target (held-out)."""
    preds, tgts = [], []
    with torch.no_grad():
        for c in clips:
            n_out = len(c["opening"])
            audio = blocks_for_clip(encoder, c["mels"][0], np.arange(n_out))
            preds.append(model.aux(model.audio_embedding(audio))[:, 0].numpy())
            tgts.append(c["opening"])
    return float(np.corrcoef(np.concatenate(preds), np.concatenate(tgts))[0, 1])


# ========================================================================================


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=md.DEFAULT_DATA_DIR)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="only check the block gather")
    ap.add_argument("--bench", action="store_true", help="only time a few steps")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    encoder = AudioEncoder()
    model = DemoUNet()

    wav0, _ = sf.read(args.data_dir / "speech" / "heldout_00a.wav", dtype="float32")
    err = check_gather(encoder, wav0)
    print(f"torch block gather vs inference_service.audio.feature_blocks: max |diff| = {err:.3g}")
    assert err < 1e-6, err
    if args.check:
        return

    t0 = time.time()
    cache = np.load(args.data_dir / "mouth_cache.npy")
    train = load_clips(args.data_dir, "train", rng)
    held = load_clips(args.data_dir, "heldout", rng, variants=1)
    weight = loss_weight(cache)
    print(
        f"data: {len(train)} train clips, {len(held)} held-out, cache {cache.shape}, "
        f"{time.time() - t0:.1f} s",
        flush=True,
    )

    params = list(encoder.parameters()) + list(model.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    warm = 100

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        p = (step - warm) / max(1, args.steps - warm)
        return 5e-5 + (args.lr - 5e-5) * 0.5 * (1 + math.cos(math.pi * p))

    steps = 6 if args.bench else args.steps
    t0 = time.time()
    run_img = run_aux = 0.0
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        x, audio, y, opens = make_batch(encoder, train, cache, rng, args.batch)
        out, aux = model.forward_with_aux(x, audio)
        l_img = ((out - y).abs() * weight).mean()
        pa, ta = aux_batch(encoder, model, train, rng)
        l_aux = F.mse_loss(torch.cat([aux, pa]), torch.cat([opens, ta]))
        loss = l_img + 0.5 * l_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run_img = 0.98 * run_img + 0.02 * l_img.item() if step else l_img.item()
        run_aux = 0.98 * run_aux + 0.02 * l_aux.item() if step else l_aux.item()
        if args.bench:
            print(f"step {step}: {time.time() - t0:.2f} s", flush=True)
            continue
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step:5d}  lr {lr_at(step):.2e}  img L1(w) {run_img:.4f}  "
                f"aux mse {run_aux:.4f}  {time.time() - t0:.0f} s",
                flush=True,
            )
        if step % 500 == 499 or step == steps - 1:
            r = heldout_opening_corr(model, encoder, held)
            print(f"  held-out corr(aux opening, target) = {r:.3f}", flush=True)
            torch.save(
                {
                    "encoder": encoder.state_dict(),
                    "unet": model.state_dict(),
                    "step": step + 1,
                    "img_l1": run_img,
                    "aux_mse": run_aux,
                },
                args.data_dir / "model.pt",
            )
    print(f"done: {steps} steps in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
