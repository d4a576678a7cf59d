"""Issue 19: the framework-neutral realtime avatar session (lipsync.agents.realtime_session):
its speech accounting alone, and a session against the real services. Bounded waits, no
timing thresholds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lipsync.agents.realtime_session import (
    AvatarError,
    AvatarFrame,
    RealtimeAvatarSession,
    SpeechLedger,
    padded_clip_length,
)
from lipsync.client import LipsyncError, clip_frames
from lipsync.core.audio import MIN_SAMPLES
from tests.avatar_factory import speech_like


@pytest.mark.parametrize("n", [1, 640, 2999, 3000, 16000, 16001, 48123, 160000])
def test_the_padded_clip_is_the_shortest_whose_frames_carry_all_its_audio(n):
    p = padded_clip_length(n)
    assert p >= max(n, MIN_SAMPLES)
    assert clip_frames(p) * 640 >= n
    shorter = p - 200
    if shorter >= max(n, MIN_SAMPLES):
        assert clip_frames(shorter) * 640 < n
    if n >= MIN_SAMPLES:  # shorter ones get the shortest clip's 4 frames
        assert clip_frames(p) <= -(-n // 640) + 1  # duration x fps, +1 at most


def pcm(n: int, value: int = 1) -> bytes:
    return np.full(n, value, np.int16).tobytes()


def test_ledger_remote_frames_trim_the_padding_and_end_the_utterance():
    ledger = SpeechLedger(max_samples=10**6)
    ledger.add(pcm(1000, 7))
    ledger.add(pcm(700, 8))
    assert ledger.open
    pad = ledger.end()
    assert pad == padded_clip_length(1700) - 1700 and not ledger.open
    frames = [ledger.take(remote=True) for _ in range(clip_frames(1700 + pad))]
    audio = b"".join(a for a, _ in frames)
    assert audio == pcm(1000, 7) + pcm(700, 8)  # all of it, none of the padding
    assert [end for _, end in frames] == [False] * (len(frames) - 1) + [True]
    assert ledger.empty and ledger.take(remote=True) == (b"", False)


def test_ledger_local_frames_take_what_has_arrived():
    ledger = SpeechLedger(max_samples=10**6)
    ledger.add(pcm(900))
    assert ledger.take(remote=False) == (pcm(640), False)
    assert ledger.take(remote=False) == (pcm(260), False)  # the rest so far, not ended
    assert ledger.take(remote=False) == (b"", False)  # waiting for more
    ledger.add(pcm(100))
    ledger.end()
    assert ledger.take(remote=False) == (pcm(100), True)
    assert ledger.empty


def test_ledger_idle_ends_a_begun_utterance_and_bounds_what_it_holds():
    ledger = SpeechLedger(max_samples=2000)
    ledger.add(pcm(1500))
    ledger.end()
    assert ledger.idle_seen() == (False, 0)  # not begun: the service has not placed it yet
    ledger.take(remote=True)
    assert ledger.idle_seen() == (True, 0) and ledger.empty  # a cut tail: over
    ledger.add(pcm(1500))
    with pytest.raises(OverflowError):
        ledger.add(pcm(600))
    ledger.clear()
    ledger.add(pcm(2000))  # room again


def test_ledger_keeps_speech_the_service_dropped_for_local_frames():
    ledger = SpeechLedger(max_samples=10**6)
    ledger.add(pcm(640, 1) + pcm(4360, 2))
    ledger.end()
    ledger.take(remote=True)  # the service showed one frame, then idled
    assert ledger.idle_seen() == (False, 4360)
    assert ledger.take(remote=False) == (pcm(640, 2), False)  # the rest, shown here


async def collect_utterance(session: RealtimeAvatarSession) -> list[AvatarFrame]:
    got: list[AvatarFrame] = []
    async for item in session.frames():
        assert not isinstance(item, AvatarError), item
        got.append(item)
        if item.segment_end:
            return got
    raise AssertionError("the stream ended")


def test_stereo_speech_at_48k_comes_back_as_its_mono_mix_at_16k(services):
    import soxr

    mono = soxr.resample(speech_like(1.2, seed=61), 16000, 48000, quality="HQ")
    left = np.clip(np.rint(mono * 32768 * 0.9), -32768, 32767).astype(np.int16)
    right = np.clip(np.rint(mono * 32768 * 0.5), -32768, 32767).astype(np.int16)
    stereo = np.stack([left, right], axis=1).reshape(-1)  # interleaved

    async def run() -> list[AvatarFrame]:
        s = RealtimeAvatarSession(services.address, "alice")
        await s.start()
        try:
            for i in range(0, len(stereo), 1920):  # 20 ms of stereo 48 kHz
                s.push_audio(stereo[i : i + 1920].tobytes(), 48000, num_channels=2)
            s.end_of_speech()
            return await asyncio.wait_for(collect_utterance(s), 60)
        finally:
            await s.aclose()

    frames = asyncio.run(run())
    out = np.frombuffer(b"".join(f.audio for f in frames), np.int16)
    mix = (left.astype(np.float64) + right) / 2 / 32768
    want = soxr.resample(mix, 48000, 16000, quality="HQ") * 32768
    assert len(out) == len(want)
    assert np.abs(out - want).max() <= 1.0
    assert all(f.rgb.shape == (224, 256, 3) and f.rgb.dtype == np.uint8 for f in frames)
    indices = [f.index for f in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))


def test_an_unknown_avatar_is_a_clear_error(services):
    async def run() -> None:
        await RealtimeAvatarSession(services.address, "nobody").start()

    with pytest.raises(LipsyncError, match="unknown avatar 'nobody'"):
        asyncio.run(run())
