"""Streaming rules: when a growing clip's frame is final, and clip tails give exactly the
whole clip's audio blocks."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.engine import InferenceEngine, Timings
from lipsync.core import audio, lookahead, windows
from tests import reference_impl as ref
from tests.avatar_factory import speech_like
from tests.conftest import service_config


def brute_ready(n_samples: int) -> int:
    count = 0
    while lookahead.samples_needed(count) <= n_samples:
        count += 1
    return count


def test_samples_needed_is_the_lookahead():
    # frame 0 needs window 6 (start 19): mel frames 19..34, samples up to 200 * 34 + 400
    assert lookahead.samples_needed(0) == 7200
    ahead_ms = [lookahead.samples_needed(i) / 16 - 40 * i for i in range(200)]
    assert max(ahead_ms) == 452.5 and min(ahead_ms) >= 440


@pytest.mark.parametrize("n", [0, 1, 7199, 7200, 7201, 7799, 7800, 12345, 16000, 48000, 160_000])
def test_ready_frames_matches_brute_force(n):
    assert lookahead.ready_frames(n) == brute_ready(n)


def test_ready_frames_all_lengths():
    for n in range(0, 40000, 37):
        assert lookahead.ready_frames(n) == brute_ready(n)


def test_ready_frames_are_final_against_the_reference():
    """A ready frame's block is the same whether the clip stops here or goes on."""
    full = speech_like(3.0, seed=2).astype(np.float64)

    proj = np.random.default_rng(0).standard_normal((1280, 512)) / 40

    def encoder(w: np.ndarray) -> np.ndarray:  # any fixed function of the window
        return np.tanh(w.reshape(len(w), -1) @ proj)

    blocks_full = ref.ref_audio_blocks(ref.ref_mel(full), encoder)
    for cut in (7200, 9000, 20011, 33333):
        ready = lookahead.ready_frames(cut)
        assert ready > 0
        blocks_cut = ref.ref_audio_blocks(ref.ref_mel(full[:cut]), encoder)
        np.testing.assert_allclose(blocks_cut[:ready], blocks_full[:ready], atol=1e-6)
        # and the next frame is not final yet
        assert not np.allclose(blocks_cut[ready], blocks_full[ready], atol=1e-6)


@pytest.fixture(scope="module")
def engine(avatars_root, shared_encoder):
    e = InferenceEngine(service_config(avatars_root, shared_encoder))
    yield e
    e.close()


def test_tails_give_the_whole_clips_blocks(engine):
    clip = speech_like(4.0, seed=9)
    nets = engine.registry.get("alice")
    n_frames = windows.clip_frame_count(1 + len(clip) // audio.HOP)
    whole = engine.clip_blocks(nets, clip, np.arange(n_frames), Timings())
    for first in (0, 12, 17, 30, 55, n_frames - 8):
        offset = lookahead.tail_offset(first)
        idx = np.arange(first, min(first + 8, n_frames + 3))
        tail = engine.clip_blocks(nets, clip[offset:], idx, Timings(), sample_offset=offset)
        expected = whole[first : first + len(idx)] if idx[-1] < n_frames else None
        if expected is not None:
            np.testing.assert_allclose(tail, expected, rtol=0, atol=2e-6)


def test_tail_refuses_frames_that_need_cut_audio(engine):
    from inference_service.engine import RequestError

    clip = speech_like(3.0, seed=1)
    nets = engine.registry.get("alice")
    with pytest.raises(RequestError, match="before sample_offset"):
        engine.clip_blocks(nets, clip[6400:], np.arange(5, 9), Timings(), sample_offset=6400)
    with pytest.raises(RequestError, match="multiple"):
        engine.clip_blocks(nets, clip[100:], np.arange(30, 32), Timings(), sample_offset=100)
