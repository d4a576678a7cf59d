"""The reference mel spectrogram (docs/SEMANTICS.md, "Mel spectrogram")."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lipsync.core.audio import HOP, N_FFT, N_MELS, SAMPLE_RATE

__all__ = ["melspectrogram"]

_PREEMPHASIS = 0.97
_FMIN = 55.0
_FMAX = 7600.0
_MIN_LEVEL = 1e-5
_REF_LEVEL_DB = 20.0
_CHUNK = 256  # STFT frames processed at a time


@lru_cache(maxsize=1)
def _mel_basis_t() -> np.ndarray:
    """Transposed Slaney mel basis ``[401, 80]`` (librosa's float32 values, as float64)."""
    import librosa  # deferred: only needed once

    basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=_FMIN, fmax=_FMAX)
    out = np.ascontiguousarray(basis.T, dtype=np.float64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    """Periodic Hann window of length 800 (``scipy.signal.get_window("hann", 800)``)."""
    from scipy.signal import get_window  # the window librosa.stft uses

    w = np.asarray(get_window("hann", N_FFT, fftbins=True), dtype=np.float64)
    w.flags.writeable = False
    return w


def melspectrogram(samples: np.ndarray) -> np.ndarray:
    """Reference mel spectrogram of a 16 kHz clip.

    Pre-emphasis ``y[t] = x[t] - 0.97 x[t-1]``; STFT with n_fft = win = 800, hop 200,
    periodic Hann, centred with 400 zeros of padding on each side; magnitude; Slaney mel
    basis (80 bands, 55..7600 Hz); ``20 log10(max(1e-5, mel)) - 20``; normalised as
    ``clip(8 (S + 100) / 100 - 4, -4, 4)``. Computed in float64.

    Parameters
    ----------
    samples : np.ndarray
        Mono samples at 16 kHz, ``[N]``.

    Returns
    -------
    np.ndarray
        float32 ``[T, 80]`` with ``T = 1 + N // 200``.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    n = x.size
    pad = N_FFT // 2
    padded = np.zeros(n + 2 * pad, dtype=np.float64)
    padded[pad] = x[0] if n else 0.0
    # pre-emphasis written straight into the padded buffer
    np.subtract(x[1:], _PREEMPHASIS * x[:-1], out=padded[pad + 1 : pad + n])
    n_frames = 1 + n // HOP
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(n_frames, N_FFT),
        strides=(HOP * padded.itemsize, padded.itemsize),
        writeable=False,
    )
    window, basis = _hann(), _mel_basis_t()
    mel = np.empty((n_frames, N_MELS), dtype=np.float64)
    buf = np.empty((min(n_frames, _CHUNK), N_FFT), dtype=np.float64)
    for s in range(0, n_frames, _CHUNK):  # chunks bound the temporaries for long clips
        e = min(n_frames, s + _CHUNK)
        windowed = np.multiply(frames[s:e], window, out=buf[: e - s])
        np.dot(np.abs(np.fft.rfft(windowed, axis=1)), basis, out=mel[s:e])  # [.., 401] @ [401, 80]
    np.maximum(mel, _MIN_LEVEL, out=mel)
    db = 20.0 * np.log10(mel) - _REF_LEVEL_DB
    norm = 8.0 * (db + 100.0) / 100.0 - 4.0
    np.clip(norm, -4.0, 4.0, out=norm)
    return norm.astype(np.float32)
