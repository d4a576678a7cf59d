"""The StreamComposite stages (compositing_service/streaming/) one at a time, with fakes
for the inference client, the compositor and the clock: no gRPC, no models."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from compositing_service.compositor import BatchCrops
from compositing_service.inference_client import InferCall, Mouths
from compositing_service.streaming import StreamError, StreamSession
from compositing_service.streaming.composite_stage import CompositeStage, OutFrame
from compositing_service.streaming.handoff import Handoff
from compositing_service.streaming.infer_stage import InferStage, frame_audio, speech_flags
from compositing_service.streaming.ingest import AudioIngest, AudioTail, Clip, SampleBuffer
from compositing_service.streaming.output import (
    LATE,
    SKIPPED,
    FrameMessages,
    OfflineSink,
    PaceCounts,
    RealtimePacer,
)
from compositing_service.streaming.planner import Batch, Planner
from compositing_service.streaming.schedule import Schedule
from lipsync.config import StreamConfig
from lipsync.core import audio, lookahead, windows
from lipsync.core.timeline import pingpong
from lipsync.proto import compositing_pb2 as cpb
from lipsync.serving.logs import call_ids, current_ids
from tests.avatar_factory import speech_like

FPS = 25
FRAME_S = 1 / FPS


# -- fakes -------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class RecordingSink:
    """A ClipSink that records what the ingest stage hands over."""

    def __init__(self) -> None:
        self.clips: list[Clip] = []
        self.events: list[tuple[str, int]] = []
        self.closed = False

    def clip_started(self, clip: Clip) -> None:
        self.clips.append(clip)
        self.events.append(("started", clip.id))

    def clip_grew(self, clip: Clip) -> None:
        self.events.append(("grew", clip.id))

    def clip_ended(self, clip: Clip) -> None:
        self.events.append(("ended", clip.id))

    def input_closed(self) -> None:
        self.closed = True


@dataclass
class FakeAvatar:
    count: int = 7
    fps: int = FPS


class FakeCompositor:
    """Crops tagged with their background index; 'JPEGs' that say what was pasted where."""

    def crops(self, avatar, indices: list[int]) -> BatchCrops:
        inner = np.zeros((len(indices), 320, 320, 3), np.uint8)
        inner[:, 0, 0, 0] = indices
        return BatchCrops(list(indices), [np.full(1, i) for i in indices], inner)

    def composite(self, avatar, indices, mouths, crops=None) -> list[bytes]:
        assert [int(c[0]) for c in crops] == list(indices)
        return [f"bg{i}:m{int(m[0, 0, 0])}".encode() for i, m in zip(indices, mouths, strict=True)]


class FakeInference:
    """Mouths marked with their clip frame number; records each call."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[dict] = []
        self.fail = fail

    def infer(self, call: InferCall) -> Mouths:
        # the stage sends face crops and the clip, never visual input or features
        assert call.face_crops is not None and call.clip is not None
        assert call.visual_input is None and call.audio_features is None
        self.calls.append(
            dict(
                model_id=call.model_id,
                batch_size=call.batch_size,
                backgrounds=[int(v) for v in call.face_crops[:, 0, 0, 0]],
                clip=call.clip,
                first=call.clip_frame_offset,
            )
        )
        if self.fail is not None:
            raise self.fail
        first, size = call.clip_frame_offset, call.batch_size
        px = np.zeros((size, 320, 320, 3), np.uint8)
        px[:, 0, 0, 0] = np.arange(first, first + size) % 256
        return Mouths(px, {}, 0, "fake", px.nbytes)


def ingest_chunks(x: np.ndarray, sizes, rate: int = 16000, encoding: str = "f32le"):
    sink = RecordingSink()
    ingest = AudioIngest(rate, encoding, sink)
    i, k = 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        ingest.audio(x[i : i + n].tobytes())
        i, k = i + n, k + 1
    return ingest, sink


def all_samples(clip: Clip) -> np.ndarray:
    return clip._samples.get(0, clip.length)


def ended_clip(seconds: float, seed: int = 0, clip_id: int = 0) -> Clip:
    clip = Clip(clip_id, 16000)
    clip.add(speech_like(seconds, seed=seed))
    clip.end()
    return clip


# -- ingest ------------------------------------------------------------------------------
def test_ingest_is_invariant_to_chunking():
    x = speech_like(2.1, seed=1)
    ready_at_end = []
    for sizes in ([160], [7, 3001, 640], [len(x)], [12345, 1]):
        ingest, sink = ingest_chunks(x, sizes)
        (clip,) = sink.clips
        assert clip.length == len(x) and clip.ready() == lookahead.ready_frames(len(x))
        np.testing.assert_array_equal(all_samples(clip), x)
        ingest.close()
        assert sink.events[-1] == ("ended", 0) and sink.closed
        ready_at_end.append(clip.ready())
    assert set(ready_at_end) == {windows.frames_of_samples(len(x))}


def test_ingest_resamples_chunk_by_chunk_like_the_whole_clip():
    x16 = speech_like(1.5, seed=2)
    for rate in (48000, 22050):
        import soxr

        x = soxr.resample(x16, 16000, rate).astype(np.float32)
        whole = audio.resample_to_16k(x, rate)
        for sizes in ([441], [4801, 17]):
            ingest, sink = ingest_chunks(x, sizes, rate=rate)
            ingest.end_of_audio()
            got = all_samples(sink.clips[0])
            assert len(got) == len(whole)
            np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6)


def test_ingest_decodes_int16_and_refuses_bad_chunks():
    pcm = np.array([0, 16384, -32768, 32767], "<i2")
    ingest, sink = ingest_chunks(pcm, [4], encoding="s16le")
    np.testing.assert_array_equal(all_samples(sink.clips[0]), audio.from_int16(pcm))
    with pytest.raises(StreamError, match="whole samples"):
        ingest.audio(b"\0" * 7)
    with pytest.raises(StreamError, match="NaN"):
        AudioIngest(16000, "f32le", RecordingSink()).audio(np.full(3, np.nan, "<f4").tobytes())


def test_ingest_starts_a_new_clip_after_end_and_after_interrupt():
    sink = RecordingSink()
    ingest = AudioIngest(16000, "f32le", sink)
    ingest.audio(b"")  # empty chunks start nothing
    assert sink.clips == []
    one = speech_like(0.3, seed=3).tobytes()
    ingest.audio(one)
    ingest.end_of_audio()
    ingest.audio(one)
    ingest.interrupt(1)
    ingest.audio(one)
    sink.clips[2].end()  # ended elsewhere (the planner's gap flush): audio opens clip 3
    ingest.audio(one)
    ingest.close()
    assert [c.id for c in sink.clips] == [0, 1, 2, 3]
    assert ("ended", 0) in sink.events and ("ended", 3) in sink.events
    assert ("ended", 1) not in sink.events  # dropped by the interrupt, never ended
    assert all(c.length == len(one) // 4 for c in sink.clips)


def test_clip_forgets_its_head_and_keeps_what_later_frames_need():
    x = speech_like(12.0, seed=4)
    clip = Clip(0, 16000)
    held = []
    first = 0
    for i in range(0, len(x), 1600):
        clip.add(x[i : i + 1600])
        stop = clip.ready()
        if stop > first:
            tail, arrivals = clip.take(first, stop)
            assert tail.offset == lookahead.tail_offset(first)
            np.testing.assert_array_equal(tail.samples, x[tail.offset : tail.end])
            # up to the last frame's lookahead, not the whole backlog
            end = min(i + 1600, len(x), lookahead.samples_needed(stop - 1))
            assert tail.end == end and len(arrivals) == stop - first
            first = stop
            held.append(clip.held)
    assert first > 250
    assert max(held) <= 24000  # at most 1.5 s of audio held, not 12 s
    clip.end()
    tail, _ = clip.take(first, clip.total)
    np.testing.assert_array_equal(tail.samples, x[tail.offset :])


def test_short_clip_is_padded_to_the_minimum_and_empty_clip_has_no_frames():
    clip = Clip(0, 16000)
    short = speech_like(0.05, seed=5)
    clip.add(short)
    assert clip.ready() == 0
    assert clip.end() and not clip.end()  # once
    got = all_samples(clip)
    assert len(got) == audio.MIN_SAMPLES
    np.testing.assert_array_equal(got[: len(short)], short)
    assert not got[len(short) :].any()
    assert clip.total == windows.frames_of_samples(audio.MIN_SAMPLES)
    assert not clip.add(short)  # an ended clip takes no more audio
    empty = Clip(1, 16000)
    empty.end()
    assert empty.total == 0 and empty.length == 0


def test_sample_buffer_get_pads_before_its_start_and_clips_at_its_end():
    b = SampleBuffer()
    b.append(np.arange(1, 41, dtype=np.float32))
    b.forget_before(10)
    assert b.base == 10 and b.held == 30 and b.length == 40
    np.testing.assert_array_equal(b.get(8, 12), [0, 0, 11, 12])
    np.testing.assert_array_equal(b.get(38, 45), [39, 40])
    b.append(np.zeros(100_000, np.float32))  # grows, keeping only what is held
    assert b.length == 100_040 and b.get(10, 11)[0] == 11


# -- planner -----------------------------------------------------------------------------
def planner(realtime=False, max_batch=8, clock=None, schedule=None, **kw) -> Planner:
    clock = clock or FakeClock()
    return Planner(
        schedule or Schedule(FPS, clock0=clock()),
        realtime=realtime,
        max_batch=max_batch,
        jitter_ms=kw.get("jitter_ms", 30.0),
        gap_flush_ms=kw.get("gap_flush_ms", 250.0),
        clock=clock,
    )


def test_planner_plans_the_frames_the_lookahead_allows():
    p = planner(max_batch=100)
    clip = Clip(0, 16000)
    x = speech_like(3.0, seed=6)
    p.clip_started(clip)
    assert p.plan() is None  # no audio yet
    planned = 0
    for n in (7199, 7200, 9000, 20011, 33333):
        clip.add(x[clip.length : n])
        p.clip_grew(clip)
        b = p.plan()
        ready = lookahead.ready_frames(n)
        if ready == planned:
            assert b is None
            continue
        assert (b.clip, b.first, b.stop) == (0, planned, ready)
        assert b.tail.offset == lookahead.tail_offset(planned)
        assert b.tail.end == min(n, lookahead.samples_needed(ready - 1))
        planned = ready
    assert planned == lookahead.ready_frames(33333) and p.plan() is None
    clip.add(x[33333:])
    clip.end()
    p.clip_ended(clip)
    b = p.plan()
    assert (b.first, b.stop) == (planned, windows.frames_of_samples(len(x)))
    assert p.plan() is None and not p.done
    p.input_closed()
    assert p.done and p.next_batch() is None


def test_planner_batches_at_most_max_batch_and_clips_follow_each_other():
    p = planner(max_batch=8)
    a, b = ended_clip(1.3, seed=7, clip_id=0), ended_clip(0.9, seed=8, clip_id=1)
    p.clip_started(a)
    p.clip_started(b)
    p.input_closed()
    batches = []
    while (batch := p.next_batch()) is not None:
        batches.append(batch)
    assert all(1 <= x.size <= 8 for x in batches)
    frames = [(x.clip, i) for x in batches for i in range(x.first, x.stop)]
    assert frames == [(0, i) for i in range(a.total)] + [(1, i) for i in range(b.total)]
    slots = [s for x in batches for s in x.slots]
    assert slots == list(range(a.total + b.total))  # one timeline, no gaps offline


def test_realtime_planner_places_a_clip_when_it_can_be_made_and_after_speech():
    clock = FakeClock(100.0)
    schedule = Schedule(FPS)
    schedule.start(clock())
    p = planner(realtime=True, max_batch=8, clock=clock, schedule=schedule, jitter_ms=30)
    clock.t += 1.0  # slot 25 is due now
    a = Clip(0, 16000, clock)
    a.add(speech_like(1.0, seed=9))
    p.clip_started(a)
    b1 = p.plan()
    # production estimate 40 ms + 30 ms jitter from now: 1.07 s -> slot ceil(26.75) = 27
    assert b1.slot == 27 and b1.first == 0
    assert schedule.speech_due(27) and schedule.speech_due(10_000)  # open clip: all due
    assert not schedule.speech_due(26)
    a.end()
    p.clip_ended(a)
    assert schedule.speech_due(27 + a.total - 1) and not schedule.speech_due(27 + a.total)
    while p.plan() is not None:
        pass
    # the next clip, arriving at once, goes after the first clip's slots ...
    b = ended_clip(0.5, seed=10, clip_id=1)
    p.clip_started(b)
    assert p.plan().slot == 27 + a.total
    # ... and the one after that, later, at the first slot it can make, after the player
    while p.plan() is not None:
        pass
    p.record_production(540.0)  # slower batches: the estimate moves to 0.8*40 + 0.2*540
    assert p.batch_ms == pytest.approx(140.0)
    clock.t += 10.0  # now 111 s: earliest slot ceil((11 + 0.17) / 0.04) = 280
    c = ended_clip(0.5, seed=11, clip_id=2)
    p.clip_started(c)
    assert p.plan().slot == 280
    while p.plan() is not None:
        pass
    schedule.passed(400)  # a player past that: the clip starts at its next slot
    d = ended_clip(0.5, seed=12, clip_id=3)
    p.clip_started(d)
    assert p.plan().slot == 401


def test_realtime_planner_flushes_a_clip_the_player_waits_on_after_a_gap():
    clock = FakeClock()
    schedule = Schedule(FPS, clock0=clock())
    p = planner(realtime=True, clock=clock, schedule=schedule, gap_flush_ms=250)
    clip = Clip(0, 16000, clock)
    clip.add(speech_like(0.8, seed=13))
    p.clip_started(clip)
    while p.plan() is not None:
        pass
    clock.t += 1.0  # no audio for a second, but the player is not waiting: no flush
    assert p.plan() is None and not clip.ended
    schedule.set_waiting(True)
    b = p.plan()
    assert clip.ended and clip.total == windows.frames_of_samples(12800)
    while (more := p.plan()) is not None:
        b = more
    assert b.stop == clip.total
    slot0 = b.slot - b.first
    assert not schedule.speech_due(slot0 + clip.total)


def test_planner_interrupt_drops_clips_and_placed_speech():
    p = planner()
    a = ended_clip(2.0, seed=14)
    p.clip_started(a)
    b1 = p.plan()
    assert b1.epoch == 0 and p.schedule.speech_due(b1.slot + 20)
    p.schedule.passed(3)
    p.interrupt(1)
    assert p.plan() is None and not p.schedule.speech_due(4)
    b = ended_clip(0.5, seed=15, clip_id=1)
    p.clip_started(b)
    b2 = p.plan()
    assert (b2.epoch, b2.clip, b2.first, b2.slot) == (1, 1, 0, 4)
    p.stop()
    assert p.plan() is None and p.next_batch() is None


# -- inference ---------------------------------------------------------------------------
def loud_then_silent() -> np.ndarray:
    t = np.arange(32000) / 16000
    return (0.5 * np.sin(2 * np.pi * 200 * t) * (t < 1.0)).astype(np.float32)


def test_infer_stage_asks_for_the_tail_and_frames_of_the_batch():
    x = loud_then_silent()
    clip = Clip(0, 16000)
    clip.add(x)
    clip.end()
    inference = FakeInference()
    stage = InferStage(
        "alice",
        FakeAvatar(count=7),
        inference,
        FakeCompositor(),
        start_frame_idx=3,
        return_audio=True,
    )
    first, stop, slot = 30, 38, 100
    tail, arrivals = clip.take(first, stop)
    out = stage.run(Batch(0, 0, first, stop, slot, tail, arrivals, 0.0))
    (call,) = inference.calls
    assert call["model_id"] == "alice" and call["batch_size"] == 8 and call["first"] == 30
    assert call["clip"].sample_offset == lookahead.tail_offset(30) == 3200 * 3
    assert call["clip"].sample_rate == 16000 and call["clip"].encoding == "f32le"
    end = min(len(x), lookahead.samples_needed(37))
    np.testing.assert_array_equal(np.frombuffer(call["clip"].pcm, "<f4"), x[9600:end])
    want_bg = [pingpong(3 + s, 7) for s in range(100, 108)]
    assert call["backgrounds"] == out.backgrounds == want_bg
    assert [int(m[0, 0, 0]) for m in out.mouths] == list(range(30, 38))
    # speech: +-100 ms around the frame; the sound stops at 1.0 s = frame 25
    assert out.speech == [False] * 8
    assert speech_flags(tail, 20, 26) == [True] * 5 + [True]  # frame 25 still hears 23..24
    assert speech_flags(tail, 27, 30) == [True, False, False]
    # audio: each frame's own 640 samples, rint(32768 x) as s16le
    assert all(len(a) == 1280 for a in out.audio)
    got = np.frombuffer(frame_audio(tail, 20, 21)[0], "<i2")
    np.testing.assert_array_equal(got, audio.to_int16(x[20 * 640 : 21 * 640]))


def test_infer_stage_pads_audio_past_the_clip_end_and_flags_clip_start():
    x = loud_then_silent()[:1000]
    tail = AudioTail(0, x)
    a = np.frombuffer(frame_audio(tail, 1, 2)[0], "<i2")
    np.testing.assert_array_equal(a[:360], audio.to_int16(x[640:]))
    assert len(a) == 640 and not a[360:].any()
    assert frame_audio(tail, 5, 6)[0] == bytes(1280)
    assert speech_flags(tail, 0, 1) == [True]  # zeros before the start count in the RMS
    assert speech_flags(tail, 5, 6) == [False]  # nothing arrived around it
    stage = InferStage("m", FakeAvatar(), FakeInference(), FakeCompositor())
    out = stage.run(Batch(0, 0, 0, 2, 0, tail, [0.0, 0.0], 0.0))
    assert out.audio == [b"", b""]  # no return_audio


def test_infer_stage_drops_batches_of_an_older_epoch():
    inference = FakeInference()
    stage = InferStage("m", FakeAvatar(), inference, FakeCompositor())
    tail = AudioTail(0, loud_then_silent())
    stage.interrupt(2)
    assert stage.run(Batch(1, 0, 0, 4, 0, tail, [0.0] * 4, 0.0)) is None
    assert inference.calls == []  # not even asked
    assert stage.run(Batch(2, 0, 0, 4, 0, tail, [0.0] * 4, 0.0)) is not None


# -- compositing -------------------------------------------------------------------------
def test_composite_stage_keeps_the_batch_order():
    inference = FakeInference()
    infer = InferStage("m", FakeAvatar(count=5), inference, FakeCompositor())
    comp = CompositeStage(FakeAvatar(count=5), FakeCompositor())
    tail = AudioTail(0, loud_then_silent())
    frames: list[OutFrame] = []
    for first, stop in ((0, 8), (8, 11), (11, 19)):
        arrivals = [float(i) for i in range(first, stop)]
        inferred = infer.run(Batch(0, 4, first, stop, 50 + first, tail, arrivals, 0.0))
        frames += comp.run(inferred)
    assert [f.clip_frame for f in frames] == list(range(19))
    assert [f.slot for f in frames] == list(range(50, 69))
    assert [f.jpeg for f in frames] == [f"bg{pingpong(50 + i, 5)}:m{i}".encode() for i in range(19)]
    assert [f.arrival for f in frames] == [float(i) for i in range(19)]
    assert {f.clip for f in frames} == {4}
    comp.interrupt(1)
    assert comp.run(inferred) is None


def test_handoff_is_bounded_and_closes():
    h: Handoff[int] = Handoff(2)
    assert h.put(1) and h.put(2)
    blocked = threading.Thread(target=h.put, args=(3,))
    blocked.start()
    blocked.join(0.05)
    assert blocked.is_alive()  # full: waits
    assert h.get() == 1
    blocked.join(5)
    h.close()
    assert [h.get(), h.get(), h.get()] == [2, 3, None]
    h2: Handoff[int] = Handoff(1)
    h2.put(1)
    h2.cancel()
    assert h2.get() is None and not h2.put(2)


# -- output ------------------------------------------------------------------------------
def out_frame(slot: int, epoch: int = 0, clip: int = 0, arrival: float = 0.0) -> OutFrame:
    return OutFrame(epoch, slot, b"J%d" % slot, True, clip, slot, slot % 7, b"", arrival)


def messages(clock=None, return_audio=False) -> FrameMessages:
    return FrameMessages(FPS, 7, 2, lambda i: b"idle%d" % i, return_audio, clock or FakeClock())


def test_offline_sink_sends_frames_in_order_and_ends():
    sink = OfflineSink(messages(), Schedule(FPS), capacity=100)
    sink.put([out_frame(0), out_frame(1)])
    sink.put([out_frame(2)])
    sink.finish()
    got = list(sink.frames())
    assert [f.index for f in got] == [0, 1, 2]
    assert [f.jpeg for f in got] == [b"J0", b"J1", b"J2"]
    assert all(f.generated and f.pts_ms == 40.0 * f.index for f in got)


def test_offline_sink_waits_for_room_and_drops_on_interrupt():
    schedule = Schedule(FPS)
    sink = OfflineSink(messages(), schedule, capacity=2)
    sink.put([out_frame(0), out_frame(1)])
    putter = threading.Thread(target=sink.put, args=([out_frame(2)],))
    putter.start()
    putter.join(0.05)
    assert putter.is_alive()  # full: the compositor waits (backpressure)
    frames = sink.frames()
    assert next(frames).index == 0
    putter.join(5)
    assert sink.queued == 2
    sink.interrupt(1)  # drops frames 1 and 2; frames of epoch 0 are refused from now on
    assert sink.queued == 0
    sink.put([out_frame(3, epoch=0)])
    sink.put([out_frame(7, epoch=1)])
    sink.finish()
    assert [f.index for f in frames] == [7]
    assert schedule.player == 8


def test_offline_sink_raises_the_failure():
    sink = OfflineSink(messages(), Schedule(FPS), capacity=4)
    sink.put([out_frame(0)])
    sink.fail(StreamError("bad chunk"))
    sink.fail(RuntimeError("later"))  # the first failure wins
    with pytest.raises(StreamError, match="bad chunk"):
        list(sink.frames())


def pacer(clock: FakeClock, schedule: Schedule | None = None, on_event=None) -> RealtimePacer:
    return RealtimePacer(
        messages(clock, return_audio=True),
        schedule or Schedule(FPS),
        clock=clock,
        sleep=clock.sleep,
        poll_s=0.001,
        on_event=on_event,
    )


def test_pacer_sends_idle_frames_on_the_clock_when_no_speech_is_due():
    clock = FakeClock(50.0)
    p = pacer(clock)
    frames = p.frames()
    got = [next(frames) for _ in range(6)]
    assert [f.index for f in got] == list(range(6))
    assert not any(f.generated or f.speech for f in got)
    assert [f.background_frame for f in got] == [pingpong(2 + i, 7) for i in range(6)]
    assert got[3].jpeg == b"idle%d" % pingpong(5, 7) and got[3].clip == -1
    assert all(len(f.audio) == 1280 and not any(f.audio) for f in got)
    assert clock.t == pytest.approx(50.0 + 5 * FRAME_S)  # slept until each was due
    p.finish()
    assert list(frames) == []  # nothing due, nothing queued: the stream ends


def test_pacer_skips_idle_slots_when_the_client_is_behind():
    clock = FakeClock(0.0)
    p = pacer(clock)
    frames = p.frames()
    assert next(frames).index == 0
    clock.t += 0.5  # the client took 500 ms: slots 1..12 are due
    nxt = next(frames)
    # slot s is skipped while the clock is more than two frames past it (0.04 s + 0.08)
    assert nxt.index == 11 and clock.t == 0.5  # due at 0.44: sent at once
    assert next(frames).index == 12 and clock.t == 0.5  # due at 0.48
    assert next(frames).index == 13 and clock.t == pytest.approx(0.52)  # back on the clock
    # slots 1..10 skipped; slot 11 went 60 ms after its slot (late), slot 12 20 ms (not)
    assert p.counts == PaceCounts(skipped=10, late=1)


def test_pacer_counts_a_skipped_slot_and_late_frames_where_it_paces():
    clock = FakeClock(0.0)
    schedule = Schedule(FPS)
    events: list[str] = []
    p = pacer(clock, schedule, on_event=events.append)
    frames = p.frames()
    assert next(frames).index == 0 and events == []  # on time
    clock.t = 0.15  # slot 1 (due 0.04) is over two frames behind; slot 2 (0.08) is not
    assert next(frames).index == 2
    assert events == [SKIPPED, LATE]  # slot 2 went 70 ms after it was due
    assert p.counts == PaceCounts(skipped=1, late=1)
    assert next(frames).index == 3 and clock.t == 0.15  # due 0.12: 30 ms is not late
    assert schedule.place(4, 1) == 4  # speech on slot 4 (due 0.16)
    clock.t = 0.26  # its frame is made 100 ms after its slot: a speech slot is never skipped
    p.put([out_frame(4)])
    f4 = next(frames)
    assert (f4.index, f4.generated) == (4, True)
    assert events == [SKIPPED, LATE, LATE] and p.counts == PaceCounts(skipped=1, late=2)
    assert next(frames).index == 5 and clock.t == 0.26  # due 0.20: late again
    assert next(frames).index == 6 and clock.t == 0.26  # due 0.24: 20 ms is not late
    assert next(frames).index == 7 and clock.t == pytest.approx(0.28)  # back on the clock
    assert events == [SKIPPED, LATE, LATE, LATE] and p.counts == PaceCounts(1, 3)


def test_pacer_sends_speech_in_its_slots_and_waits_for_a_late_one():
    clock = FakeClock(0.0)
    schedule = Schedule(FPS)
    p = pacer(clock, schedule)
    frames = p.frames()
    assert next(frames).index == 0
    assert schedule.place(2, 3) == 2  # speech on slots 2, 3, 4
    p.put([out_frame(2, arrival=-0.5), out_frame(3)])
    got = [next(frames) for _ in range(3)]
    assert [(f.index, f.generated) for f in got] == [(1, False), (2, True), (3, True)]
    assert got[1].jpeg == b"J2" and got[1].latency_ms == pytest.approx(500 + 80)

    def late() -> None:  # frame 4 comes only once the player waits for it
        while not schedule.waiting:
            threading.Event().wait(0.001)
        p.put([out_frame(4)])

    t = threading.Thread(target=late)
    t.start()
    f4 = next(frames)
    t.join(5)
    assert (f4.index, f4.generated) == (4, True)
    assert not schedule.waiting
    assert next(frames).generated is False  # slot 5: idle again


def test_pacer_interrupt_drops_queued_speech():
    clock = FakeClock(0.0)
    schedule = Schedule(FPS)
    p = pacer(clock, schedule)
    frames = p.frames()
    schedule.place(1, 10)  # slots 1..10
    p.put([out_frame(s) for s in range(1, 11)])
    got = [next(frames) for _ in range(3)]
    assert [f.generated for f in got] == [False, True, True]
    # what the session does on interrupt: the output first, then the planner's schedule
    p.interrupt(1)
    schedule.interrupt()
    p.put([out_frame(s) for s in range(4, 8)])  # in flight before the interrupt: refused
    rest = [next(frames) for _ in range(5)]
    assert [f.index for f in rest] == [3, 4, 5, 6, 7]
    assert not any(f.generated for f in rest)
    p.fail(RuntimeError("inference went away"))
    with pytest.raises(RuntimeError, match="went away"):
        next(frames)


def test_pacer_stops_when_cancelled():
    clock = FakeClock(0.0)
    schedule = Schedule(FPS)
    p = pacer(clock, schedule)
    frames = p.frames()
    schedule.place(1, 5)
    assert next(frames).index == 0
    threading.Timer(0.02, p.cancel).start()
    assert list(frames) == []  # it was waiting for slot 1's speech frame


# -- the whole session, with fakes -------------------------------------------------------
def session(inference=None, jitter_ms: float = 30.0, **start) -> StreamSession:
    return StreamSession(
        cpb.StreamStart(model_id="alice", **start),
        FakeAvatar(count=7),
        inference or FakeInference(),
        FakeCompositor(),
        StreamConfig(max_batch=8, max_queued_frames=16, jitter_ms=jitter_ms),
        lambda i: b"idle%d" % i,
    )


def requests(*clips: np.ndarray, chunk: int = 1000, interrupt_after: int | None = None):
    for k, x in enumerate(clips):
        for i in range(0, len(x), chunk):
            yield cpb.StreamRequest(audio=x[i : i + chunk].tobytes())
        yield cpb.StreamRequest(end_of_audio=True)
        if interrupt_after == k:
            yield cpb.StreamRequest(interrupt=True)


def run_offline(s: StreamSession, reqs) -> list[cpb.StreamFrame]:
    reader = threading.Thread(target=s.feed, args=(reqs,))
    reader.start()
    try:
        return list(s.frames())
    finally:
        s.cancel()
        reader.join(5)


def test_offline_session_wires_the_stages():
    a, b = speech_like(1.1, seed=16), speech_like(0.7, seed=17)
    inference = FakeInference()
    frames = run_offline(session(inference, start_frame_idx=4), requests(a, b))
    n_a, n_b = windows.frames_of_samples(len(a)), windows.frames_of_samples(len(b))
    assert [f.index for f in frames] == list(range(n_a + n_b))
    assert [(f.clip, f.clip_frame) for f in frames] == [(0, i) for i in range(n_a)] + [
        (1, i) for i in range(n_b)
    ]
    assert [f.jpeg for f in frames] == [
        f"bg{pingpong(4 + f.index, 7)}:m{f.clip_frame}".encode() for f in frames
    ]
    assert all(c["batch_size"] <= 8 and c["model_id"] == "alice" for c in inference.calls)


class IdsInference(FakeInference):
    """Records the log ids each inference call is made under."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[dict[str, str]] = []
        self.threads: set[str] = set()

    def infer(self, *args, **kwargs) -> Mouths:
        self.ids.append(current_ids())
        self.threads.add(threading.current_thread().name)
        return super().infer(*args, **kwargs)


def test_session_threads_carry_the_callers_log_ids():
    """The producer and compositor threads run in a copy of the context `frames` is
    iterated in (the RPC's: its log ids and, with tracing on, its span)."""
    inference = IdsInference()
    with call_ids(request_id="rid-1", stream_id="rid-1", rpc="StreamComposite"):
        frames = run_offline(session(inference), requests(speech_like(0.5, seed=22)))
    assert frames and inference.ids
    assert inference.threads == {"stream-produce"}
    assert all(
        ids == {"request_id": "rid-1", "stream_id": "rid-1", "rpc": "StreamComposite"}
        for ids in inference.ids
    )
    assert current_ids() == {}


def test_offline_session_raises_bad_input_and_inference_failures():
    with pytest.raises(StreamError, match="sample_rate"):
        session(sample_rate=5)
    with pytest.raises(StreamError, match="audio_encoding"):
        session(audio_encoding=7)
    bad = iter([cpb.StreamRequest(audio=b"\0" * 7)])
    with pytest.raises(StreamError, match="whole samples"):
        run_offline(session(), bad)
    with pytest.raises(RuntimeError, match="no inference"):
        run_offline(
            session(FakeInference(fail=RuntimeError("no inference"))), requests(speech_like(0.5))
        )


def test_offline_session_interrupt_moves_on_and_keeps_the_timeline():
    a, b = speech_like(3.0, seed=18), speech_like(0.5, seed=19)
    s = session()
    frames = run_offline(s, requests(a, b, interrupt_after=0))
    clip1 = [f for f in frames if f.clip == 1]
    assert [f.clip_frame for f in clip1] == list(range(windows.frames_of_samples(len(b))))
    idx = [f.index for f in frames]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)  # after it, slots go on


def test_schedule_keeps_idle_slots_between_placed_clips():
    s = Schedule(FPS)
    assert s.place(5, 3) == 5  # slots 5, 6, 7
    assert s.place(10, None) == 10  # a growing clip from slot 10 on
    assert [slot for slot in range(15) if s.speech_due(slot)] == [5, 6, 7, 10, 11, 12, 13, 14]
    s.close(10, 2)
    assert [slot for slot in range(15) if s.speech_due(slot)] == [5, 6, 7, 10, 11]
    assert s.place(0, 1) == 12  # after the speech placed before
    assert not s.due_or_pass(4) and s.player == 5
    assert s.due_or_pass(5) and s.player == 5  # the player stays until it is sent
    s.passed(5)
    s.interrupt()
    assert not any(s.speech_due(slot) for slot in range(20))
    assert s.place(0, 4) == 6


def test_realtime_session_plays_whole_clips_sent_at_once():
    """Clips that have ended when they are placed, with time to make them (here 200 ms
    of jitter: 5 slots) between the player and their first slot: the player sends idle
    frames up to there, then the clips' frames."""
    a, b = speech_like(0.4, seed=20), speech_like(0.3, seed=21)
    n_a, n_b = windows.frames_of_samples(len(a)), windows.frames_of_samples(len(b))
    s = session(jitter_ms=200.0, realtime=True, return_audio=True)
    got: list[cpb.StreamFrame] = []
    seen = {0: threading.Event(), 1: threading.Event()}

    def reqs():
        yield from requests(a)
        seen[0].wait(10)
        yield from requests(b)
        seen[1].wait(10)

    reader = threading.Thread(target=s.feed, args=(reqs(),))
    reader.start()
    for f in s.frames():
        got.append(f)
        if f.generated and f.clip_frame == (n_a if f.clip == 0 else n_b) - 1:
            seen[f.clip].set()
        if seen[1].is_set() and not f.generated:
            break
    s.cancel()
    reader.join(5)
    idx = [f.index for f in got]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    gen = [(f.clip, f.clip_frame) for f in got if f.generated]
    assert gen == [(0, i) for i in range(n_a)] + [(1, i) for i in range(n_b)]
    first_a = next(i for i, f in enumerate(got) if f.generated)
    first_b = next(i for i, f in enumerate(got) if f.generated and f.clip == 1)
    assert got[first_a].index >= 5 and not any(f.generated for f in got[:first_a])
    assert not any(f.generated for f in got[first_a + n_a : first_b])
    assert got[first_b].index - got[first_a + n_a - 1].index > 5  # idle while b was made
    assert all(len(f.audio) == 1280 for f in got)


def test_realtime_call_budget_grows_with_the_measured_batch_time():
    """A realtime inference call may take 0.5 s, or three batches' production time where a
    slow model makes that longer; offline calls have no budget of their own."""
    from compositing_service.streaming.session import REALTIME_BUDGET_BATCHES

    rt = session(realtime=True)
    assert rt.inferring.call_budget_s is not None
    rt.planner.batch_ms = 40.0
    assert rt.inferring.call_budget_s() == 0.5
    rt.planner.batch_ms = 700.0
    assert rt.inferring.call_budget_s() == pytest.approx(REALTIME_BUDGET_BATCHES * 0.7)
    assert session(realtime=False).inferring.call_budget_s is None
