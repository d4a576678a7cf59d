"""Frame counts, the audio encoder's mel windows and the UNet's per-frame audio blocks
(docs/SEMANTICS.md, "Windows" and "Audio blocks")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lipsync.core.audio import (
    FEATURE_DIM,
    HALF_CONTEXT,
    HOP,
    MEL_FPS,
    MIN_SAMPLES,
    N_MELS,
    VIDEO_FPS,
    WINDOW,
    AudioError,
)

__all__ = [
    "clip_frame_count",
    "encoder_rows_needed",
    "feature_blocks",
    "frames_of_samples",
    "mel_window_starts",
    "mel_windows",
    "video_frame_count",
    "windows_at",
]


def _check_mel_frames(mel_frames: int) -> int:
    t = int(mel_frames)
    if t < WINDOW:
        raise AudioError(
            f"{t} mel frames is too short: at least {WINDOW} are needed "
            f"({MIN_SAMPLES} samples at 16 kHz)"
        )
    return t


def video_frame_count(mel_frames: int) -> int:
    """Number of encoder windows ``n = int((T - 16) / 80 * 25) + 2``.

    The float expression is kept as the reference computes it: it is not always
    ``floor(5 (T - 16) / 16) + 2`` (e.g. T = 384 gives 116, not 117).
    """
    t = _check_mel_frames(mel_frames)
    return int((t - WINDOW) / MEL_FPS * VIDEO_FPS) + 2


def clip_frame_count(mel_frames: int) -> int:
    """Video frames a clip of ``mel_frames`` mel frames yields: ``n + 2``."""
    return video_frame_count(mel_frames) + 2


def mel_window_starts(mel_frames: int) -> np.ndarray:
    """Start row of each of the ``n`` mel windows.

    ``s = int(80 * j / 25)`` (equal to ``16 j // 5`` in integers); when ``s + 16 > T`` the
    window is moved back to ``s = T - 16``.

    Returns
    -------
    np.ndarray
        int64 ``[n]``.
    """
    t = _check_mel_frames(mel_frames)
    n = video_frame_count(t)
    starts = (np.arange(n, dtype=np.int64) * MEL_FPS) // VIDEO_FPS
    np.minimum(starts, t - WINDOW, out=starts)
    return starts


def mel_windows(mel: np.ndarray, first: int = 0, stop: int | None = None) -> np.ndarray:
    """Encoder input of a clip, or of windows ``first .. stop - 1`` of it.

    Parameters
    ----------
    mel : np.ndarray
        ``[T, 80]`` from :func:`melspectrogram`, ``T >= 16``.
    first, stop : int
        Range of window indices (default: all ``n``), so that a long clip's few needed
        windows are built without the rest.

    Returns
    -------
    np.ndarray
        C-contiguous float32 ``[n, 1, 80, 16]``; window ``j`` is ``mel[s_j : s_j + 16].T``.
    """
    mel = np.asarray(mel)
    if mel.ndim != 2 or mel.shape[1] != N_MELS:
        raise ValueError(f"mel must be [T, {N_MELS}], got {mel.shape}")
    return windows_at(mel, mel_window_starts(mel.shape[0])[first:stop])


def windows_at(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Encoder inputs ``[len(starts), 1, 80, 16]`` float32 of the windows starting at the
    given mel rows (each ``0 <= s <= T - 16``)."""
    if len(starts) and (starts.min() < 0 or starts.max() + WINDOW > mel.shape[0]):
        raise ValueError("window outside the mel spectrogram")
    rows = starts[:, None] + np.arange(WINDOW)  # [n, 16]
    win = mel[rows]  # [n, 16, 80]
    out = np.empty((starts.size, 1, N_MELS, WINDOW), dtype=np.float32)
    out[:, 0] = win.transpose(0, 2, 1)
    return out


def frames_of_samples(n_samples: int) -> int:
    """Video frames of a 16 kHz clip of ``n_samples`` samples (``T = 1 + n // 200``)."""
    return clip_frame_count(1 + int(n_samples) // HOP)


def encoder_rows_needed(n: int, frame_indices: np.ndarray) -> tuple[int, int]:
    """The range [lo, hi) of encoder outputs F that these frames' audio blocks read.

    Frame i reads padded rows F'[i-8 : i+8] (those inside [0, n+2)), and
    F'[r] = F[clip(r - 1, 0, n - 1)]; so F rows i-9 .. i+6, clipped to [0, n).
    """
    lo = min(max(int(np.min(frame_indices)) - 9, 0), n - 1)
    hi = max(min(int(np.max(frame_indices)) + 7, n), lo + 1)
    return lo, hi


def feature_blocks(
    features: np.ndarray,
    frame_indices: np.ndarray | Sequence[int],
    first_row: int = 0,
    total_rows: int | None = None,
) -> np.ndarray:
    """UNet audio input of the given output frames.

    With ``F' = [F[0], F[0..n-1], F[n-1]]`` (length ``n + 2``), frame ``i`` takes rows
    ``F'[i-8 : i+8]``, zeros for rows outside ``[0, n+2)`` (so any ``i``, including frames
    past the clip's end, is defined), reshaped row-major to ``[32, 16, 16]``.

    Parameters
    ----------
    features : np.ndarray
        Encoder output: all of ``F`` ``[n, 512]``, or the rows
        ``F[first_row : first_row + len(features)]`` of an ``F`` of ``total_rows`` rows
        (so a long clip's few needed rows suffice; every row the frames read must be there).
    frame_indices : array-like of int
        Output frame numbers ``i``.

    Returns
    -------
    np.ndarray
        C-contiguous float32 ``[len(frame_indices), 32, 16, 16]``.
    """
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] != FEATURE_DIM:
        raise ValueError(f"features must be [n >= 1, {FEATURE_DIM}], got {f.shape}")
    n = f.shape[0] if total_rows is None else total_rows
    if first_row < 0 or first_row + f.shape[0] > n:
        raise ValueError("features rows lie outside [0, total_rows)")
    idx = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
    rows = idx[:, None] + np.arange(-HALF_CONTEXT, HALF_CONTEXT)  # [B, 16] rows of F'
    outside = (rows < 0) | (rows >= n + 2)
    # F'[r] = F[clip(r - 1, 0, n - 1)]; look it up among the rows we were given.
    local = np.clip(rows - 1, 0, n - 1) - first_row
    missing = ~outside & ((local < 0) | (local >= f.shape[0]))
    if np.any(missing):
        raise ValueError("the frames read feature rows that were not given")
    # table = the given rows followed by one zero row used for every out-of-range row
    table = np.empty((f.shape[0] + 1, FEATURE_DIM), dtype=np.float32)
    table[:-1] = f
    table[-1] = 0.0
    local[outside] = f.shape[0]
    return table[local].reshape(idx.size, 32, 16, 16)
