"""Dynamic batching: coalescing, ordering, errors, and results equal to unbatched runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from inference_service.batching import DynamicBatcher
from inference_service.engine import EngineRequest, InferenceEngine
from tests.avatar_factory import speech_like
from tests.conftest import service_config


class Recorder:
    def __init__(self, delay: float = 0.01):
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        if np.any(x < 0):
            raise ValueError("negative input")
        time.sleep(self.delay)
        return x * 2 + y


def test_concurrent_requests_coalesce_and_keep_order():
    rec = Recorder(delay=0.02)
    b = DynamicBatcher(rec, max_batch=16, max_wait_s=0.5)
    inputs = [np.arange(3 * i, 3 * i + 3, dtype=np.float32) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda x: b(x, np.ones_like(x)), inputs))
    for x, out in zip(inputs, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2 + 1)
    assert sum(rec.sizes) == 24
    assert len(rec.sizes) < 8  # some requests shared a run
    assert max(rec.sizes) <= 16
    assert b.stats.mean_batch > 3


def test_large_request_is_split_and_reassembled():
    rec = Recorder(delay=0)
    b = DynamicBatcher(rec, max_batch=4, max_wait_s=0.0)
    x = np.arange(11, dtype=np.float32)
    np.testing.assert_array_equal(b(x, x), x * 3)
    assert rec.sizes == [4, 4, 3]


def test_error_reaches_only_the_callers_of_that_run_and_batcher_keeps_working():
    rec = Recorder(delay=0)
    b = DynamicBatcher(rec, max_batch=8, max_wait_s=0.0)
    with pytest.raises(ValueError, match="negative"):
        b(np.array([-1.0]), np.array([0.0]))
    np.testing.assert_array_equal(b(np.array([2.0]), np.array([1.0])), [5.0])


def test_worker_exits_when_idle_and_restarts():
    rec = Recorder(delay=0)
    b = DynamicBatcher(rec, max_batch=8, max_wait_s=0.0, idle_exit_s=0.05)
    b(np.array([1.0]), np.array([1.0]))
    deadline = time.monotonic() + 5
    while b._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b._worker is None
    np.testing.assert_array_equal(b(np.array([1.0]), np.array([0.0])), [2.0])


@pytest.fixture(scope="module")
def engines(avatars_root, shared_encoder):
    def make(enabled: bool) -> InferenceEngine:
        cfg = service_config(avatars_root, shared_encoder)
        cfg.inference.batching.enabled = enabled
        # room for every concurrent row in one run, and a wide wait: coalescing must not
        # depend on how the threads are scheduled
        cfg.inference.batching.max_batch = cfg.inference.batching.cpu_max_batch = 32
        cfg.inference.batching.max_wait_ms = 500.0  # wide: the test must not depend on timing
        return InferenceEngine(cfg)

    on, off = make(True), make(False)
    yield on, off
    on.close()
    off.close()


def test_batched_results_equal_unbatched(engines):
    on, off = engines
    rng = np.random.default_rng(4)
    clips = [speech_like(1.0 + 0.2 * i, seed=i) for i in range(4)]
    crops = [rng.integers(0, 256, (3 + i, 320, 320, 3), dtype=np.uint8) for i in range(4)]
    expected = [
        off.infer(EngineRequest("alice", len(c), face_crops=c, clip=a, clip_frame_offset=i)).mouths
        for i, (c, a) in enumerate(zip(crops, clips, strict=True))
    ]
    start = threading.Barrier(4)

    def go(i: int) -> np.ndarray:
        start.wait()
        return on.infer(
            EngineRequest(
                "alice", len(crops[i]), face_crops=crops[i], clip=clips[i], clip_frame_offset=i
            )
        ).mouths

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(go, range(4)))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)
    unet_batcher = on.registry.get("alice").runner.batcher
    assert unet_batcher is not None and unet_batcher.stats.runs < unet_batcher.stats.requests


def test_cpu_runs_use_the_cpu_batch_cap():
    from inference_service.networks import BatchPolicy

    p = BatchPolicy(True, 32, 0.002, 4)
    assert p.for_provider("CPUExecutionProvider").max_batch == 4
    assert p.for_provider("CUDAExecutionProvider").max_batch == 32


def test_encoder_rows_are_encoded_once_across_requests(engines):
    """Batches stepping through a clip share context windows: the cache encodes each once,
    and cached rows equal freshly computed ones."""
    _, off = engines
    clip = speech_like(2.0, seed=11)
    crops = np.zeros((8, 320, 320, 3), np.uint8)
    enc = off.registry.get("alice").encoder
    fresh = [
        off.infer(
            EngineRequest("alice", 8, face_crops=crops, clip=clip, clip_frame_offset=k)
        ).mouths
        for k in (0, 8, 16)
    ]
    misses = enc.misses
    again = [
        off.infer(
            EngineRequest("alice", 8, face_crops=crops, clip=clip, clip_frame_offset=k)
        ).mouths
        for k in (0, 8, 16)
    ]
    assert enc.misses == misses  # nothing encoded twice
    for a, b in zip(fresh, again, strict=True):
        np.testing.assert_array_equal(a, b)
