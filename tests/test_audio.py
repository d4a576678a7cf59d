"""inference_service.audio against the reference semantics (tests/reference_impl.py) and
against hand-computed cases."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import soundfile as sf
import soxr

from lipsync.core.audio import (
    HOP,
    MEL_FPS,
    MIN_SAMPLES,
    SAMPLE_RATE,
    VIDEO_FPS,
    WINDOW,
    AudioError,
    decode_pcm,
)
from lipsync.core.mel import melspectrogram
from lipsync.core.windows import (
    clip_frame_count,
    feature_blocks,
    mel_window_starts,
    mel_windows,
    video_frame_count,
)
from tests.reference_impl import (
    ref_audio_blocks,
    ref_block_for_frame,
    ref_frame_count,
    ref_load,
    ref_mel,
    ref_resample,
    ref_window,
    ref_windows,
)

MEL_TOL = 1e-4

# ------------------------------------------------------------------------ signals


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Harmonic source with a gliding pitch, formant-shaped harmonics, syllable-rate AM and
    some breath noise; float32 in about [-0.6, 0.6]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 140.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t) + 10.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = (700.0, 1200.0, 2600.0)
    y = np.zeros(n)
    for h in range(1, 30):
        fh = h * 140.0
        gain = sum(math.exp(-(((fh - f) / 250.0) ** 2)) for f in formants) + 0.05
        y += gain / h * np.sin(h * phase)
    am = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2
    y = y * am + 0.02 * rng.standard_normal(n)
    return (0.6 * y / np.max(np.abs(y))).astype(np.float32)


def clipped(n: int) -> np.ndarray:
    """Over-driven sine saturated at +-1 (square-ish)."""
    t = np.arange(n) / SAMPLE_RATE
    return np.clip(5.0 * np.sin(2 * np.pi * 220.0 * t), -1.0, 1.0).astype(np.float32)


SIGNALS = {
    "speech_3s": speech_like(3 * SAMPLE_RATE),
    "silence_1s": np.zeros(SAMPLE_RATE, dtype=np.float32),
    "clipping": clipped(20000),
    "odd_3001": speech_like(3001, seed=1),
    "odd_16001": speech_like(16001, seed=2),
    "odd_12345": clipped(12345) * np.float32(0.5) + speech_like(12345, seed=3),
    "shortest_valid": speech_like(MIN_SAMPLES, seed=4),
    "noise_float64": np.random.default_rng(5).uniform(-1, 1, 7777),
    "tiny_amplitude": speech_like(5000, seed=6) * np.float32(1e-6),
    "long_two_chunks": speech_like(4 * SAMPLE_RATE + 77, seed=8),  # T = 321 > 256
}


# ------------------------------------------------------------------------ mel


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_mel_matches_librosa_recipe(name: str) -> None:
    x = SIGNALS[name]
    mel = melspectrogram(x)
    ref = ref_mel(x)
    assert mel.dtype == np.float32
    assert mel.shape == ref.shape == (1 + len(x) // HOP, 80)
    np.testing.assert_allclose(mel, ref, rtol=0, atol=MEL_TOL)


def test_mel_silence_is_floor() -> None:
    mel = melspectrogram(np.zeros(4000, dtype=np.float32))
    assert mel.shape == (21, 80)
    assert np.all(mel == -4.0)


def test_mel_float32_and_float64_inputs_agree() -> None:
    x = SIGNALS["speech_3s"]
    np.testing.assert_allclose(melspectrogram(x), melspectrogram(x.astype(np.float64)), atol=0)


def test_mel_does_not_modify_input() -> None:
    x = SIGNALS["odd_3001"].copy()
    keep = x.copy()
    melspectrogram(x)
    assert np.array_equal(x, keep)


@pytest.mark.parametrize(("n", "t"), [(3000, 16), (3199, 16), (3200, 17), (16000, 81), (1, 1)])
def test_mel_frame_count(n: int, t: int) -> None:
    assert melspectrogram(np.ones(n, dtype=np.float32)).shape == (t, 80)


def test_min_samples_is_sixteen_frames() -> None:
    assert MIN_SAMPLES == 3000
    assert 1 + MIN_SAMPLES // HOP == WINDOW
    assert 1 + (MIN_SAMPLES - 1) // HOP == WINDOW - 1
    assert (SAMPLE_RATE, HOP, MEL_FPS, VIDEO_FPS, WINDOW) == (16000, 200, 80, 25, 16)


# ------------------------------------------------------------ frame counts, windows

# n = int((T - 16) / 80 * 25) + 2, worked by hand:
#   T=16: 0/80*25 = 0 -> 2          T=17: 1/80*25 = 0.3125 -> 2
#   T=19: 3/80*25 = 0.9375 -> 2     T=20: 4/80*25 = 1.25 -> 3
#   T=32: 16/80*25 = 5 -> 7         T=96: 80/80*25 = 25 -> 27
#   T=801 (10 s): 785/80*25 = 245.3125 -> 247
#   T=384: 368/80 = 4.6 -> 4.6*25 = 114.99999999999999 in floats -> 116 (exact maths: 117)
HAND_COUNTS = {16: 2, 17: 2, 19: 2, 20: 3, 32: 7, 96: 27, 384: 116, 801: 247}


@pytest.mark.parametrize(("t", "n"), sorted(HAND_COUNTS.items()))
def test_video_frame_count_by_hand(t: int, n: int) -> None:
    assert video_frame_count(t) == n
    assert clip_frame_count(t) == n + 2


def test_frame_count_keeps_the_float_expression() -> None:
    # the float expression is not the integer floor for some T (the first is 384)
    quirks = [t for t in range(16, 2000) if video_frame_count(t) != (5 * (t - 16)) // 16 + 2]
    assert quirks[:3] == [384, 672, 752]
    for t in range(16, 3000):
        assert video_frame_count(t) == ref_frame_count(t)
        assert clip_frame_count(t) == ref_frame_count(t) + 2


# starts: s = int(80 j / 25) = int(3.2 j); if s + 16 > T: s = T - 16
HAND_STARTS = {
    16: [0, 0],  # j=1: s=3, e=19 > 16 -> s=0
    17: [0, 1],  # j=1: s=3, e=19 > 17 -> s=1
    20: [0, 3, 4],  # j=2: s=6, e=22 > 20 -> s=4
    32: [0, 3, 6, 9, 12, 16, 16],  # j=6: s=19, e=35 > 32 -> s=16
    96: [
        0,
        3,
        6,
        9,
        12,
        16,
        19,
        22,
        25,
        28,
        32,
        35,
        38,
        41,
        44,
        48,
        51,
        54,
        57,
        60,
        64,
        67,
        70,
        73,
        76,
        80,
        80,
    ],  # j=26: s=83, e=99 > 96 -> s=80
}


@pytest.mark.parametrize("t", sorted(HAND_STARTS))
def test_mel_window_starts_by_hand(t: int) -> None:
    starts = mel_window_starts(t)
    assert starts.tolist() == HAND_STARTS[t]
    assert len(starts) == video_frame_count(t)


def test_mel_window_starts_at_the_float_quirk() -> None:
    starts = mel_window_starts(384)
    assert len(starts) == 116
    assert starts[-1] == 368  # j=115: 80*115/25 = 368, ends exactly at T; no clamp


def test_mel_window_starts_match_reference() -> None:
    for t in range(16, 1200):
        starts = mel_window_starts(t)
        mel = np.arange(t, dtype=np.float64)[:, None] * np.ones((1, 80))
        ref = [int(ref_window(mel, j)[0, 0]) for j in range(ref_frame_count(t))]
        assert starts.tolist() == ref, t
        assert starts.min() >= 0 and starts.max() + WINDOW <= t


@pytest.mark.parametrize("t", [0, 1, 15])
def test_too_few_mel_frames_raise(t: int) -> None:
    for fn in (video_frame_count, clip_frame_count, mel_window_starts):
        with pytest.raises(AudioError, match="at least 16"):
            fn(t)
    with pytest.raises(AudioError):
        mel_windows(np.zeros((t, 80), dtype=np.float32))


@pytest.mark.parametrize("t", [16, 17, 20, 96, 384, 401])
def test_mel_windows_match_reference(t: int) -> None:
    mel = np.random.default_rng(t).uniform(-4, 4, (t, 80)).astype(np.float32)
    win = mel_windows(mel)
    ref = ref_windows(mel)
    assert win.dtype == np.float32 and win.flags.c_contiguous
    assert win.shape == (video_frame_count(t), 1, 80, 16)
    assert np.array_equal(win, ref)


def test_mel_windows_from_real_mel() -> None:
    mel = melspectrogram(SIGNALS["speech_3s"])
    assert np.array_equal(mel_windows(mel), ref_windows(mel))
    with pytest.raises(ValueError):
        mel_windows(mel.T)


# -------------------------------------------------------------------- feature blocks


def _hand_features(n: int) -> np.ndarray:
    """Row k is (k + 1) * 1000 + [0, 1, ..., 511]: every row and column is identifiable."""
    return ((np.arange(n)[:, None] + 1) * 1000 + np.arange(512)[None]).astype(np.float32)


def _rows(block: np.ndarray) -> list[int]:
    """Label each of the 16 rows of a [32, 16, 16] block: 0 for a zero row, else k + 1."""
    flat = block.reshape(16, 512)
    out = []
    for row in flat:
        if not row.any():
            out.append(0)
        else:
            label = int(row[0]) // 1000
            assert np.array_equal(row, label * 1000 + np.arange(512, dtype=np.float32))
            out.append(label)
    return out


def test_feature_blocks_by_hand() -> None:
    # n = 3 windows: F' = [F0, F0, F1, F2, F2] -> labels [1, 1, 2, 3, 3], length 5
    f = _hand_features(3)
    idx = [0, 1, 4, 8, 12, 13, -1, -9, 20]
    blocks = feature_blocks(f, idx)
    assert blocks.shape == (len(idx), 32, 16, 16)
    assert blocks.dtype == np.float32 and blocks.flags.c_contiguous
    z = [0]
    expected = {
        0: z * 8 + [1, 1, 2, 3, 3] + z * 3,  # rows -8..7
        1: z * 7 + [1, 1, 2, 3, 3] + z * 4,  # rows -7..8
        4: z * 4 + [1, 1, 2, 3, 3] + z * 7,  # rows -4..11 (last frame of the clip)
        8: [1, 1, 2, 3, 3] + z * 11,  # rows 0..15
        12: [3] + z * 15,  # rows 4..19: past the clip's end
        13: z * 16,  # rows 5..20
        -1: z * 9 + [1, 1, 2, 3, 3] + z * 2,  # rows -9..6
        -9: z * 16,  # rows -17..-2
        20: z * 16,
    }
    for b, i in enumerate(idx):
        assert _rows(blocks[b]) == expected[i], i


def test_feature_blocks_row_major_reshape() -> None:
    f = _hand_features(40)
    block = feature_blocks(f, [20])[0]
    # frame 20 takes F'[12:28] = F[11:27]; [16, 512] row-major -> [32, 16, 16]
    assert np.array_equal(block, f[11:27].reshape(32, 16, 16))
    assert np.array_equal(block[1], f[11, 256:].reshape(16, 16))


def test_feature_blocks_single_window() -> None:
    f = _hand_features(1)  # F' = [F0, F0, F0]
    assert _rows(feature_blocks(f, [0])[0]) == [0] * 8 + [1, 1, 1] + [0] * 5


def test_feature_blocks_match_reference() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 17, 60):
        f = rng.standard_normal((n, 512)).astype(np.float32)
        idx = np.arange(-10, n + 14)
        got = feature_blocks(f, idx)
        ref = np.stack([ref_block_for_frame(f, int(i)) for i in idx])
        assert np.array_equal(got, ref), n
        # a list, a numpy int array, an empty request
        assert np.array_equal(feature_blocks(f, [3, 0]), ref[[13, 10]])
        assert feature_blocks(f, np.array([], dtype=np.int64)).shape == (0, 32, 16, 16)


def test_feature_blocks_rejects_bad_features() -> None:
    with pytest.raises(ValueError):
        feature_blocks(np.zeros((0, 512), np.float32), [0])
    with pytest.raises(ValueError):
        feature_blocks(np.zeros((4, 256), np.float32), [0])


def test_whole_clip_against_reference() -> None:
    """decode -> mel -> windows -> (fake encoder) -> blocks, vs the literal reference."""
    rng = np.random.default_rng(11)
    proj = rng.standard_normal((80 * 16, 512)).astype(np.float32) / 40

    def encoder(x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1) @ proj

    wav = SIGNALS["speech_3s"]
    mel = melspectrogram(decode_pcm(wav.tobytes(), "f32le", 16000))
    n = video_frame_count(mel.shape[0])
    got = feature_blocks(encoder(mel_windows(mel)), np.arange(clip_frame_count(mel.shape[0])))
    ref = ref_audio_blocks(ref_mel(wav), encoder)
    assert got.shape == ref.shape == (n + 2, 32, 16, 16)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------ decode_pcm


def test_decode_f32_at_16k_is_identity() -> None:
    x = SIGNALS["speech_3s"]
    for rate in (16000, 0):
        y = decode_pcm(x.tobytes(), "f32le", rate)
        assert y.dtype == np.float32 and y.flags.c_contiguous and y.flags.writeable
        assert np.array_equal(y, x)


def test_decode_s16_scaling() -> None:
    vals = np.array([-32768, -1, 0, 1, 16384, 32767], dtype="<i2")
    data = np.resize(vals, MIN_SAMPLES).astype("<i2").tobytes()
    y = decode_pcm(data, "s16le", 16000)
    assert y.dtype == np.float32 and len(y) == MIN_SAMPLES
    assert y[:6].tolist() == [-1.0, -1 / 32768, 0.0, 1 / 32768, 0.5, 32767 / 32768]


def test_decode_is_little_endian() -> None:
    x = np.full(MIN_SAMPLES, 0.25, dtype=np.float32)
    assert np.all(decode_pcm(x.astype("<f4").tobytes(), "f32le", 0) == 0.25)
    s = np.full(MIN_SAMPLES, 256, dtype="<i2")  # bytes 00 01
    assert np.all(decode_pcm(s.tobytes(), "s16le", 0) == 256 / 32768)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000, 96000, 192000])
@pytest.mark.parametrize("seconds", [0.5, 1.2345])
def test_decode_resampling_matches_librosa(rate: int, seconds: float) -> None:
    n = int(seconds * rate) + 1
    t = np.arange(n) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    y = decode_pcm(x.tobytes(), "f32le", rate)
    ref = librosa.resample(x, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    assert y.dtype == ref.dtype == np.float32
    assert len(y) == len(ref) == math.ceil(n * 16000 / rate)
    assert np.array_equal(y, ref)
    assert np.array_equal(ref_resample(x, rate), ref)


def test_decode_pads_soxr_output_like_librosa() -> None:
    # soxr alone returns one sample fewer than librosa's ceil(len * 16000 / sr) here
    x = speech_like(44101, seed=9)
    assert len(soxr.resample(x, 48000, 16000, quality="HQ")) == 14700
    y = decode_pcm(x.tobytes(), "f32le", 48000)
    assert len(y) == 14701 and y[-1] == 0.0
    assert np.array_equal(y, librosa.resample(x, orig_sr=48000, target_sr=16000))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread's imports
@pytest.mark.parametrize(("subtype", "encoding"), [("PCM_16", "s16le"), ("FLOAT", "f32le")])
@pytest.mark.parametrize("rate", [16000, 44100, 22050])
def test_decode_matches_librosa_load_of_a_wav(tmp_path, subtype, encoding, rate) -> None:
    n = int(0.8 * rate) + 3
    t = np.arange(n) / rate
    x = 0.7 * np.sin(2 * np.pi * 330 * t) * np.sin(2 * np.pi * 3 * t)
    path = tmp_path / "a.wav"
    sf.write(path, x, rate, subtype=subtype)
    # the file's own samples, as a client would stream them
    raw, _ = sf.read(path, dtype="int16" if encoding == "s16le" else "float32")
    y = decode_pcm(raw.astype(raw.dtype.newbyteorder("<")).tobytes(), encoding, rate)
    assert np.array_equal(y, ref_load(str(path)))


def test_decode_min_length_boundary() -> None:
    ok = np.zeros(MIN_SAMPLES, dtype=np.float32)
    assert len(decode_pcm(ok.tobytes(), "f32le", 16000)) == MIN_SAMPLES
    with pytest.raises(AudioError, match=r"at least 0\.1875 s \(3000 samples"):
        decode_pcm(ok[:-1].tobytes(), "f32le", 16000)
    # 48 kHz: ceil(8997 / 3) = 2999 is too short, ceil(8998 / 3) = 3000 is enough
    with pytest.raises(AudioError, match="too short"):
        decode_pcm(np.zeros(8997, np.float32).tobytes(), "f32le", 48000)
    assert len(decode_pcm(np.zeros(8998, np.float32).tobytes(), "f32le", 48000)) == 3000


def test_decode_max_seconds() -> None:
    x = np.zeros(32000, dtype=np.float32)
    assert len(decode_pcm(x.tobytes(), "f32le", 16000, max_seconds=2.0)) == 32000
    with pytest.raises(AudioError, match="too long"):
        decode_pcm(x.tobytes(), "f32le", 16000, max_seconds=1.999)
    with pytest.raises(AudioError, match="too long"):  # measured on the input rate
        decode_pcm(np.zeros(48001, np.int16).tobytes(), "s16le", 48000, max_seconds=1.0)


@pytest.mark.parametrize(
    ("data", "encoding", "rate", "match"),
    [
        (b"", "f32le", 16000, "empty"),
        (b"", "s16le", 0, "empty"),
        (b"\x00" * 6001, "s16le", 16000, "multiple"),
        (b"\x00" * 12002, "f32le", 16000, "multiple"),
        (b"\x00" * 12000, "pcm", 16000, "encoding"),
        (b"\x00" * 12000, "f32be", 16000, "encoding"),
        (b"\x00" * 12000, "f32le", 7999, "out of range"),
        (b"\x00" * 12000, "f32le", 192001, "out of range"),
        (b"\x00" * 12000, "f32le", -16000, "out of range"),
        (np.full(4000, np.nan, np.float32).tobytes(), "f32le", 16000, "NaN"),
        (np.r_[np.zeros(3999), np.inf].astype(np.float32).tobytes(), "f32le", 16000, "NaN"),
        (np.r_[np.zeros(9999), -np.inf].astype(np.float32).tobytes(), "f32le", 44100, "NaN"),
    ],
)
def test_decode_rejects_bad_audio(data: bytes, encoding: str, rate: int, match: str) -> None:
    with pytest.raises(AudioError, match=match):
        decode_pcm(data, encoding, rate)


def test_audio_error_is_value_error() -> None:
    assert issubclass(AudioError, ValueError)


def test_mel_windows_range_equals_slice_of_all():
    from lipsync.core.mel import melspectrogram
    from lipsync.core.windows import mel_windows

    mel = melspectrogram(np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1)
    full = mel_windows(mel)
    np.testing.assert_array_equal(mel_windows(mel, 5, 17), full[5:17])
    np.testing.assert_array_equal(mel_windows(mel, len(full) - 3), full[-3:])
