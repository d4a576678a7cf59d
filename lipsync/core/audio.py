"""Audio input rules: PCM decoding and resampling to 16 kHz exactly as the reference's
``librosa.load(path, sr=16000)``, the one float <-> int16 rule, and padding a clip to the
shortest length the reference windows accept (docs/SEMANTICS.md, "Audio").

``tests/reference_impl.py`` is the literal oracle these functions are tested against.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FEATURE_DIM",
    "HOP",
    "MEL_FPS",
    "MIN_SAMPLES",
    "N_FFT",
    "N_MELS",
    "SAMPLES_PER_FRAME",
    "SAMPLE_RATE",
    "VIDEO_FPS",
    "WINDOW",
    "AudioError",
    "check_rate",
    "decode_pcm",
    "from_int16",
    "pad_to_min_clip",
    "pcm_samples",
    "resample_to_16k",
    "to_int16",
]

SAMPLE_RATE = 16000
HOP = 200  # samples per mel frame
N_FFT = 800
N_MELS = 80
MEL_FPS = SAMPLE_RATE // HOP  # 80
VIDEO_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640: one video frame's audio
WINDOW = 16  # mel frames per encoder window
FEATURE_DIM = 512  # audio encoder output size
HALF_CONTEXT = 8  # feature rows on each side of a video frame
# T = 1 + len // HOP mel frames; the window rule needs T >= WINDOW.
MIN_SAMPLES = (WINDOW - 1) * HOP  # 3000 samples = 0.1875 s

MIN_INPUT_RATE = 8000
MAX_INPUT_RATE = 192000
_ENCODINGS = {"f32le": np.dtype("<f4"), "s16le": np.dtype("<i2")}
INT16_SCALE = 32768.0  # int16 <-> float: x / 32768 (as libsndfile), rint(32768 x) back


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
        return from_int16(raw)  # a power of two: exact, as libsndfile does
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
        x = resample_to_16k(x, rate)
    if x.size < MIN_SAMPLES:
        raise AudioError(
            f"audio is too short: {x.size / SAMPLE_RATE:.4f} s; it must be at least "
            f"{MIN_SAMPLES / SAMPLE_RATE:.4f} s ({MIN_SAMPLES} samples at 16 kHz, "
            f"{WINDOW} mel frames)"
        )
    return x


def resample_to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """``librosa.resample(x, orig_sr=rate, target_sr=16000, res_type="soxr_hq")``."""
    import soxr  # deferred: only clips at other rates need it

    n_out = int(np.ceil(x.shape[-1] * (float(SAMPLE_RATE) / rate)))  # librosa's length
    y = np.asarray(soxr.resample(x, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)
    if y.size >= n_out:  # librosa.util.fix_length: trim, or zero-pad at the end
        return np.ascontiguousarray(y[:n_out])
    out = np.zeros(n_out, dtype=np.float32)
    out[: y.size] = y
    return out


def from_int16(x: np.ndarray) -> np.ndarray:
    """int16 samples as float32 in [-1, 1): ``x / 32768`` (exact, as libsndfile reads)."""
    y = np.asarray(x).astype(np.float32)
    y *= np.float32(1.0 / INT16_SCALE)
    return y


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float samples to int16: ``rint(32768 x)`` clipped to the int16 range, the inverse of
    :func:`from_int16` (int16 input is returned as is). The one rule for every float to
    int16 conversion: the client's PCM, MP4 audio, a stream's per-frame audio."""
    a = np.asarray(x).reshape(-1)
    if a.dtype == np.int16:
        return a
    y = np.rint(a.astype(np.float64) * INT16_SCALE)
    np.clip(y, -INT16_SCALE, INT16_SCALE - 1, out=y)
    return y.astype(np.int16)


def pad_to_min_clip(samples: np.ndarray) -> tuple[np.ndarray, bool]:
    """A clip shorter than ``MIN_SAMPLES`` zero-padded at the end to that length (the
    reference windows need 16 mel frames); returns (samples, whether it was padded)."""
    x = np.asarray(samples).reshape(-1)
    if x.size >= MIN_SAMPLES:
        return x, False
    out = np.zeros(MIN_SAMPLES, dtype=x.dtype)
    out[: x.size] = x
    return out, True
