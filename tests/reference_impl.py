"""Independent oracle: the SyncTalk_2D "ave" reference inference semantics, written as
literally as docs/SEMANTICS.md states it (librosa, scipy, OpenCV, plain loops).

Deliberately imports nothing from ``inference_service`` or ``compositing_service``: tests
compare the services against these functions. Slow but obvious; for tests only.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import librosa
import numpy as np
import scipy.signal

# ------------------------------------------------ audio ("Audio", "Mel spectrogram")


def ref_load(path: str) -> np.ndarray:
    """``librosa.load(path, sr=16000)`` -- what the reference did with the wav file."""
    wav, _ = librosa.load(path, sr=16000)
    return wav


def ref_resample(wav: np.ndarray, sr: int) -> np.ndarray:
    """The resampling step of ``librosa.load(path, sr=16000)`` for mono samples at ``sr``."""
    wav = np.asarray(wav, dtype=np.float32)
    if sr == 16000:
        return wav
    return librosa.resample(wav, orig_sr=sr, target_sr=16000, res_type="soxr_hq")


def ref_mel(wav16k: np.ndarray) -> np.ndarray:
    """Reference mel spectrogram ``[T, 80]`` (float64) of a 16 kHz clip."""
    # pre-emphasis
    y = scipy.signal.lfilter([1, -0.97], [1], wav16k)
    # STFT with librosa's defaults (periodic Hann, center=True, constant zero padding)
    d = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800)
    # magnitude -> mel
    mel_basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    mel = np.dot(mel_basis, np.abs(d))
    # amplitude to dB, minus the reference level
    s = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    # symmetric normalisation to [-4, 4]
    s = np.clip(8 * (s + 100) / 100 - 4, -4, 4)
    return s.T


# -------------------------------------- windows, features ("Windows", "Audio blocks")


def ref_frame_count(mel_frames: int) -> int:
    """``n = int((T - 16) / 80 * 25) + 2``."""
    return int((mel_frames - 16) / 80 * 25) + 2


def ref_window(mel: np.ndarray, j: int) -> np.ndarray:
    """Mel window of video frame ``j`` as ``[80, 16]``."""
    t = mel.shape[0]
    s = int(80 * j / 25)
    e = s + 16
    if e > t:
        e = t
        s = t - 16
    return mel[s:e, :].T


def ref_windows(mel: np.ndarray) -> np.ndarray:
    """All ``n`` encoder inputs ``[n, 1, 80, 16]`` float32."""
    n = ref_frame_count(mel.shape[0])
    out = []
    for j in range(n):
        out.append(ref_window(mel, j)[None].astype(np.float32))
    return np.stack(out)


def ref_block_for_frame(features: np.ndarray, i: int) -> np.ndarray:
    """Audio input ``[32, 16, 16]`` of output frame ``i`` (any ``i``).

    ``features`` are the encoder outputs ``F`` ``[n, 512]``; they are padded to
    ``F' = [F[0], F..., F[n-1]]`` here and rows ``F'[i-8 : i+8]`` are taken, zeros outside.
    """
    n = features.shape[0]
    padded = [features[0]] + [features[k] for k in range(n)] + [features[n - 1]]
    rows = []
    for r in range(i - 8, i + 8):
        if 0 <= r < len(padded):
            rows.append(np.asarray(padded[r], dtype=np.float32))
        else:
            rows.append(np.zeros(features.shape[1], dtype=np.float32))
    block = np.stack(rows)  # [16, 512]
    return block.reshape(32, 16, 16)


def ref_audio_blocks(mel: np.ndarray, encoder_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Audio inputs of all ``n + 2`` frames of a clip, ``[n + 2, 32, 16, 16]``.

    ``encoder_fn`` maps ``[B, 1, 80, 16]`` float32 to ``[B, 512]``.
    """
    windows = ref_windows(mel)
    feats = np.asarray(encoder_fn(windows), dtype=np.float32)
    n = feats.shape[0]
    return np.stack([ref_block_for_frame(feats, i) for i in range(n + 2)])


# --------------------------------------------------------------- visual ("Face crop", "Paste-back")


def ref_visual_input(img: np.ndarray, rect) -> tuple[np.ndarray, np.ndarray]:
    """Face crop ``[328, 328, 3]`` uint8 and the UNet visual input ``[6, 320, 320]`` float32."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    crop_img = img[y1:y2, x1:x2]
    crop_img = cv2.resize(crop_img, (328, 328), interpolation=cv2.INTER_CUBIC)
    crop_img_ori = crop_img.copy()
    img_real_ex = crop_img[4:324, 4:324].copy()
    img_real_ex_ori = img_real_ex.copy()
    img_masked = cv2.rectangle(img_real_ex_ori, (5, 5, 310, 305), (0, 0, 0), -1)
    img_masked = img_masked.transpose(2, 0, 1).astype(np.float32)
    img_real_ex = img_real_ex.transpose(2, 0, 1).astype(np.float32)
    img_real_ex_t = img_real_ex / 255.0
    img_masked_t = img_masked / 255.0
    img_concat = np.concatenate([img_real_ex_t, img_masked_t], axis=0)
    return crop_img_ori, img_concat


def ref_paste(img: np.ndarray, rect, crop328: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """New frame with ``pred`` ``[3, 320, 320]`` (float in [0, 1]) pasted back."""
    x1, y1, x2, y2 = (int(v) for v in rect)
    img = img.copy()
    crop_img_ori = crop328.copy()
    pred = pred.transpose(1, 2, 0) * 255
    pred = np.array(pred, dtype=np.uint8)
    crop_img_ori[4:324, 4:324] = pred
    crop_img_ori = cv2.resize(crop_img_ori, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    img[y1:y2, x1:x2] = crop_img_ori
    return img


# --------------------------------------------------------------------- frames ("Background frames")


def ref_pingpong(t: int, n: int) -> int:
    """Avatar frame used by stream frame ``t`` with ``n`` avatar frames (ping-pong walk)."""
    if n == 1:
        return 0
    m = t % (2 * (n - 1))
    return m if m < n else 2 * (n - 1) - m
