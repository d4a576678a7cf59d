"""StreamComposite over real gRPC: streamed frames equal the offline frames of the whole
clip whatever the chunking; realtime sessions keep the clock; bad input fails cleanly."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest

from lipsync.client import chunked, clip_requests
from lipsync.core import audio, windows
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests.avatar_factory import speech_like
from tests.oracle import decode_jpeg, psnr


@pytest.fixture(scope="module")
def stub(services):
    channel = grpc.insecure_channel(services.address)
    yield cpb_grpc.CompositingServiceStub(channel)
    channel.close()


def offline_frames(stub, clip: np.ndarray, start: int) -> list[bytes]:
    n = windows.clip_frame_count(1 + len(clip) // audio.HOP)
    out: list[bytes] = []
    for k in range(0, n, 32):  # the test services allow 32 frames a request
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice",
                raw_audio=clip.tobytes(),
                batch_size=min(32, n - k),
                start_frame_idx=start + k,
                clip_frame_offset=k,
            )
        )
        assert resp.success, resp.error
        out.extend(resp.composited_frames)
    return out


def chunks(x: np.ndarray, rng: np.random.Generator, lo_ms: int = 10, hi_ms: int = 700):
    i = 0
    while i < len(x):
        n = int(rng.integers(lo_ms, hi_ms + 1)) * 16
        yield x[i : i + n]
        i += n


def offline_stream(stub, clips: list[np.ndarray], start: int, seed: int) -> list[cpb.StreamFrame]:
    rng = np.random.default_rng(seed)

    start_msg = cpb.StreamStart(model_id="alice", start_frame_idx=start)
    requests = clip_requests(start_msg, [chunks(clip, rng) for clip in clips])
    return list(stub.StreamComposite(requests))


def assert_same_frames(streamed: list[bytes], offline: list[bytes]) -> None:
    assert len(streamed) == len(offline)
    worst = min(
        psnr(decode_jpeg(a), decode_jpeg(b)) for a, b in zip(streamed, offline, strict=True)
    )
    assert worst >= 45.0, f"worst-frame PSNR {worst:.1f} dB"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_frames_equal_offline_frames_whatever_the_chunks(stub, seed):
    clip = speech_like(2.3 + 0.37 * seed, seed=20 + seed)
    frames = offline_stream(stub, [clip], start=3, seed=seed)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.generated and f.clip == 0 for f in frames)
    assert [f.clip_frame for f in frames] == list(range(len(frames)))
    assert [f.pts_ms for f in frames] == [40.0 * i for i in range(len(frames))]
    assert_same_frames([f.jpeg for f in frames], offline_frames(stub, clip, start=3))


def test_two_clips_continue_the_timeline(stub):
    a, b = speech_like(1.3, seed=31), speech_like(1.7, seed=32)
    frames = offline_stream(stub, [a, b], start=0, seed=5)
    n_a = windows.clip_frame_count(1 + len(a) // audio.HOP)
    first, second = frames[:n_a], frames[n_a:]
    assert {f.clip for f in first} == {0} and {f.clip for f in second} == {1}
    assert_same_frames([f.jpeg for f in first], offline_frames(stub, a, start=0))
    assert_same_frames([f.jpeg for f in second], offline_frames(stub, b, start=n_a))


def test_int16_and_resampled_input_and_speech_flags(stub):
    sr = 24000
    t = np.arange(int(2.0 * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (t < 1.0)).astype(np.float32)
    pcm = (tone * 32767).astype("<i2")

    start = cpb.StreamStart(
        model_id="alice", sample_rate=sr, audio_encoding=cpb.PCM_S16LE, return_audio=True
    )
    frames = list(stub.StreamComposite(clip_requests(start, [chunked(pcm, 1000)])))
    assert len(frames) == windows.clip_frame_count(1 + (2 * 16000) // audio.HOP)
    flags = [f.speech for f in frames]
    assert all(flags[2:20]) and not any(flags[35:])  # sound for the first second only
    assert all(len(f.audio) == 1280 for f in frames)


def test_short_clip_is_padded(stub):
    def requests():
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice"))
        yield cpb.StreamRequest(audio=speech_like(0.05).tobytes())

    frames = list(stub.StreamComposite(requests()))  # half-close ends the clip
    assert len(frames) == windows.clip_frame_count(1 + audio.MIN_SAMPLES // audio.HOP)


@pytest.mark.parametrize(
    "first, more, code, needle",
    [
        (cpb.StreamRequest(audio=b"\0\0\0\0"), [], grpc.StatusCode.INVALID_ARGUMENT, "start"),
        (
            cpb.StreamRequest(start=cpb.StreamStart(model_id="nobody")),
            [],
            grpc.StatusCode.NOT_FOUND,
            "unknown",
        ),
        (
            cpb.StreamRequest(start=cpb.StreamStart(model_id="../alice")),
            [],
            grpc.StatusCode.NOT_FOUND,
            "invalid",
        ),
        (
            cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", sample_rate=5)),
            [],
            grpc.StatusCode.INVALID_ARGUMENT,
            "sample_rate",
        ),
        (
            cpb.StreamRequest(start=cpb.StreamStart(model_id="alice")),
            [cpb.StreamRequest(audio=b"\0" * 7)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "whole",
        ),
        (
            cpb.StreamRequest(start=cpb.StreamStart(model_id="alice")),
            [cpb.StreamRequest(audio=np.full(100, np.nan, np.float32).tobytes())],
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN",
        ),
    ],
)
def test_bad_streams_fail_with_a_status_and_service_keeps_serving(stub, first, more, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamComposite(iter([first, *more])))
    assert err.value.code() == code
    assert needle.lower() in err.value.details().lower()
    assert stub.Health(cpb.HealthRequest()).healthy
    assert len(offline_stream(stub, [speech_like(0.5)], start=0, seed=1)) > 0


def test_realtime_session_speech_silence_speech_interrupt(stub):
    """Frames keep coming with consecutive pts through speech, a pause with no audio,
    speech again and an interrupt; speech frames show up while speech plays."""
    outbox: queue.Queue = queue.Queue()
    speech = speech_like(1.2, seed=40)

    def requests():
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=True))
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    def feed_realtime(x: np.ndarray) -> None:
        for i in range(0, len(x), 1600):  # 100 ms chunks at real time
            outbox.put(cpb.StreamRequest(audio=x[i : i + 1600].tobytes()))
            time.sleep(0.1)

    received: list[cpb.StreamFrame] = []
    stream = stub.StreamComposite(requests())

    def read():
        for f in stream:
            received.append(f)

    def wait_until(cond, what: str) -> None:  # polled: no fixed window to miss
        end = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < end and reader.is_alive(), what
            time.sleep(0.02)

    def idle_after(index: int) -> bool:
        return any(f.index > index and not f.generated for f in list(received))

    n_clip = windows.clip_frame_count(1 + len(speech) // audio.HOP)
    reader = threading.Thread(target=read)
    reader.start()
    feed_realtime(speech)
    # silence, no audio at all: until the pause has ended the first clip and the avatar idles
    wait_until(
        lambda: sum(f.generated and f.clip == 0 for f in list(received)) == n_clip
        and idle_after(max(f.index for f in list(received) if f.generated)),
        "the first clip did not end in idle frames",
    )
    n_before_second = len(received)
    feed_realtime(speech)
    outbox.put(cpb.StreamRequest(interrupt=True))
    at_interrupt = received[-1].index
    wait_until(lambda: idle_after(at_interrupt), "no idle frame after the interrupt")
    n_at_close = len(received)
    outbox.put(None)
    reader.join(30)
    assert not reader.is_alive()

    idx = [f.index for f in received]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert all(f.pts_ms == 40.0 * f.index for f in received)
    clips = {f.clip for f in received if f.generated}
    assert clips == {0, 1}  # the pause ended the first clip; the second speech is a new one
    gen0 = [f for f in received if f.generated and f.clip == 0]
    gen1 = [f for f in received if f.generated and f.clip == 1]
    assert len(gen0) == windows.clip_frame_count(1 + len(speech) // audio.HOP)
    assert [f.clip_frame for f in gen0] == list(range(len(gen0)))
    assert any(f.speech for f in gen0) and gen1
    # between the two clips the avatar idled
    between = [f for f in received if gen0[-1].index < f.index < gen1[0].index]
    assert between and not any(f.generated or f.speech for f in between)
    # after the interrupt the stream went back to idle frames and kept going
    assert not received[-1].generated
    assert n_at_close > n_before_second
