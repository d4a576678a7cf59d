"""Audio side of the inference service: PCM decoding, the reference mel spectrogram, the
per-video-frame mel windows fed to the audio encoder and the per-frame feature blocks fed
to the UNet.

Everything here reproduces the SyncTalk_2D "ave" reference inference script exactly (see
``shared/reference/SYNCTALK2D.md`` sections 1 and 2); ``tests/reference_impl.py`` is the
literal oracle these functions are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import soxr

__all__ = [
    "FEATURE_DIM",
    "HOP",
    "MEL_FPS",
    "MIN_SAMPLES",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "VIDEO_FPS",
    "WINDOW",
    "AudioError",
    "clip_frame_count",
    "decode_pcm",
    "feature_blocks",
    "mel_window_starts",
    "mel_windows",
    "melspectrogram",
    "video_frame_count",
]

SAMPLE_RATE = 16000
HOP = 200
N_FFT = 800
N_MELS = 80
MEL_FPS = SAMPLE_RATE // HOP  # 80
VIDEO_FPS = 25
WINDOW = 16  # mel frames per encoder window
FEATURE_DIM = 512  # audio encoder output size
HALF_CONTEXT = 8  # feature rows on each side of a video frame
# T = 1 + len // HOP mel frames; the window rule needs T >= WINDOW.
MIN_SAMPLES = (WINDOW - 1) * HOP  # 3000 samples = 0.1875 s

MIN_INPUT_RATE = 8000
MAX_INPUT_RATE = 192000
_PREEMPHASIS = 0.97
_FMIN = 55.0
_FMAX = 7600.0
_MIN_LEVEL = 1e-5
_REF_LEVEL_DB = 20.0
_CHUNK = 256  # STFT frames processed at a time
_ENCODINGS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}


class AudioError(ValueError):
    """Bad or unusable audio; the message is meant for the client."""


def check_rate(sample_rate: int) -> int:
    """The input rate in Hz (0 means 16000); AudioError outside 8000..192000."""
    rate = SAMPLE_RATE if sample_rate == 0 else int(sample_rate)
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise AudioError(
            f"sample_rate {sample_rate} Hz is out of range "
            f"({MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz, or 0 for 16000)"
        )
    return rate


def pcm_samples(data: bytes, encoding: str) -> np.ndarray:
    """Raw mono little-endian PCM ("f32le" or "s16le", int16 scaled by 1/32768) as float32
    samples at the input rate. AudioError for an unknown encoding, bytes that are not
    whole samples, or NaN/inf samples. Used for whole clips and for stream chunks."""
    dtype = _ENCODINGS.get(encoding)
    if dtype is None:
        raise AudioError(f"unknown audio encoding {encoding!r}; expected 'f32le' or 's16le'")
    if len(data) % dtype.itemsize:
        raise AudioError(
            f"audio byte length {len(data)} is not a multiple of the {encoding} sample size "
            f"({dtype.itemsize} bytes): not whole samples"
        )
    raw = np.frombuffer(data, dtype=dtype)
    if encoding == "s16le":
        x = raw.astype(np.float32)
        x *= np.float32(1.0 / 32768.0)  # a power of two: exact, as libsndfile does
        return x
    x = raw.astype(np.float32)  # native-order, writable copy
    if not np.isfinite(x).all():
        raise AudioError("audio contains NaN or infinite samples")
    return x


def decode_pcm(
    data: bytes, encoding: str, sample_rate: int, max_seconds: float | None = None
) -> np.ndarray:
    """Decode raw mono little-endian PCM to float32 samples at 16 kHz.

    Parameters
    ----------
    data : bytes
        Raw samples, mono, little-endian.
    encoding : str
        ``"f32le"`` (float32) or ``"s16le"`` (int16, scaled by 1/32768).
    sample_rate : int
        Rate of ``data`` in Hz; 0 means 16000. Other rates are resampled exactly as
        ``librosa.load(path, sr=16000)`` does (soxr "HQ", then zero-padded or trimmed to
        ``ceil(len * 16000 / sample_rate)`` samples).
    max_seconds : float or None
        Longest clip accepted (measured on the input), or None for no limit.

    Returns
    -------
    np.ndarray
        float32 ``[N]`` at 16 kHz with ``N >= MIN_SAMPLES``.

    Raises
    ------
    AudioError
        On an unknown encoding, empty or truncated data, NaN/inf samples, a sample rate
        outside 8000..192000 Hz, a clip longer than ``max_seconds`` or shorter than
        ``MIN_SAMPLES`` after resampling.
    """
    rate = check_rate(sample_rate)
    if not data:
        raise AudioError("audio is empty")
    # the length limit is checked before anything is decoded
    size = _ENCODINGS[encoding].itemsize if encoding in _ENCODINGS else 1
    if max_seconds is not None and len(data) // size > max_seconds * rate:
        n = len(data) // size
        raise AudioError(f"audio is too long: {n / rate:.3f} s (the limit is {max_seconds:g} s)")
    x = pcm_samples(data, encoding)
    if rate != SAMPLE_RATE:
        x = _resample_to_16k(x, rate)
    if x.size < MIN_SAMPLES:
        raise AudioError(
            f"audio is too short: {x.size / SAMPLE_RATE:.4f} s; it must be at least "
            f"{MIN_SAMPLES / SAMPLE_RATE:.4f} s ({MIN_SAMPLES} samples at 16 kHz, "
            f"{WINDOW} mel frames)"
        )
    return x


def _resample_to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """``librosa.resample(x, orig_sr=rate, target_sr=16000, res_type="soxr_hq")``."""
    n_out = int(np.ceil(x.shape[-1] * (float(SAMPLE_RATE) / rate)))  # librosa's length
    y = np.asarray(soxr.resample(x, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)
    if y.size >= n_out:  # librosa.util.fix_length: trim, or zero-pad at the end
        return np.ascontiguousarray(y[:n_out])
    out = np.zeros(n_out, dtype=np.float32)
    out[: y.size] = y
    return out


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


# -- streaming: when is a growing clip's frame final? -------------------------------------
# Frame i reads encoder rows up to i + 6; row j reads mel frames s_j .. s_j + 15
# (s_j = 16 j // 5); mel frame t covers samples [200 t - 400, 200 t + 400). Once those
# samples have arrived, more audio can change neither the rows nor n's effect on frame i.
LOOKAHEAD_ROWS = HALF_CONTEXT - 2  # 6


def samples_needed(frame: int) -> int:
    """16 kHz samples of a clip that must have arrived before `frame` is final (while the
    clip is still growing). About 40 ms x frame + 452.5 ms: the algorithmic lookahead."""
    last_window = (MEL_FPS * (frame + LOOKAHEAD_ROWS)) // VIDEO_FPS
    return HOP * (last_window + WINDOW - 1) + N_FFT // 2


def ready_frames(n_samples: int) -> int:
    """How many leading frames of a still-growing clip of `n_samples` samples are final."""
    q = (n_samples - N_FFT // 2) // HOP - (WINDOW - 1)  # last usable window start
    if q < 0:
        return 0
    return max(0, (VIDEO_FPS * (q + 1) - 1) // MEL_FPS + 1 - LOOKAHEAD_ROWS)


TAIL_ALIGN = WINDOW * HOP  # 3200 samples = 16 mel rows = 5 video frames


def tail_offset(first_frame: int) -> int:
    """Where a clip tail may start (a multiple of TAIL_ALIGN) so that frames from
    `first_frame` on are computed exactly as from the whole clip."""
    return TAIL_ALIGN * max(0, (first_frame - 12) // 5)


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
