"""Issue 19: the avatar as a pipecat video service, in a real pipecat pipeline against
the real services on the test avatar (docs/AGENTS.md). Every wait is bounded; no timing
thresholds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (make setup installs it)")

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from lipsync.agents.pipecat import LipsyncVideoService
from lipsync.agents.realtime_session import padded_clip_length
from lipsync.client import clip_frames
from tests.avatar_factory import speech_like
from tests.conftest import service_config, start_services, stop_services

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0  # the bound on any one wait


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def tts_audio(rate: int, seconds: float, seed: int) -> np.ndarray:
    """Speech-like int16 audio at `rate` (made at 16 kHz, resampled like a TTS voice)."""
    import soxr

    x = speech_like(seconds, seed=seed)
    if rate != 16000:
        x = soxr.resample(x, 16000, rate, quality="HQ")
    return pcm16(np.asarray(x, np.float32))


class Sink(FrameProcessor):
    """Collects what the avatar emits, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, object]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            self.events.append(("image", frame))
        elif isinstance(frame, TTSAudioRawFrame):
            self.events.append(("audio", frame))
        elif isinstance(frame, InterruptionFrame):
            self.events.append(("interruption", frame))
        await self.push_frame(frame, direction)

    def images(self) -> list[OutputImageRawFrame]:
        return [f for k, f in self.events if k == "image"]  # type: ignore[misc]

    def audio(self) -> np.ndarray:
        chunks = [f.audio for k, f in self.events if k == "audio"]  # type: ignore[attr-defined]
        return np.frombuffer(b"".join(chunks), np.int16)

    def generated(self) -> int:
        return sum(1 for f in self.images() if f.metadata["lipsync"]["generated"])


class Upstream(FrameProcessor):
    """Placed before the avatar: records the errors it pushes upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, ErrorFrame) and direction == FrameDirection.UPSTREAM:
            self.errors.append(frame)
        await self.push_frame(frame, direction)


async def until(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def speak(worker: PipelineWorker, pcm: np.ndarray, rate: int, chunk_ms: int = 20) -> None:
    """What a TTS service sends: started, audio chunks (faster than real time), stopped."""
    await worker.queue_frame(TTSStartedFrame())
    step = rate * chunk_ms // 1000
    for i in range(0, len(pcm), step):
        await worker.queue_frame(
            TTSAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=rate, num_channels=1)
        )
    await worker.queue_frame(TTSStoppedFrame())


async def run_pipeline(address: str, script, **options) -> tuple[Sink, Upstream]:
    """Run [upstream recorder, avatar, sink] with `script(worker, sink, upstream)` driving
    it; the script ends the pipeline with an EndFrame."""
    avatar = LipsyncVideoService(address=address, model_id="alice", **options)
    sink, upstream = Sink(), Upstream()
    worker = PipelineWorker(
        Pipeline([upstream, avatar, sink]), enable_rtvi=False, idle_timeout_secs=None
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def drive() -> None:
        await until(lambda: len(sink.images()) >= 3, "the first idle frames")
        await script(worker, sink, upstream)
        await worker.queue_frame(EndFrame())

    await asyncio.wait_for(asyncio.gather(runner.run(), drive()), 3 * WAIT_S)
    return sink, upstream


@pytest.mark.parametrize("rate", [16000, 24000])
def test_frames_and_audio_of_an_utterance(services, rate):
    """Frames = duration x fps (+-1); the audio out is the audio in at 16 kHz; images are
    the avatar's size, RGB, and the idle frames go on after the speech."""
    pcm = tts_audio(rate, 2.0, seed=rate)

    async def script(worker, sink, _):
        await speak(worker, pcm, rate)
        await until(
            lambda: any(f.metadata["lipsync"]["segment_end"] for f in sink.images()),
            "the utterance's last frame",
        )
        n = len(sink.images())
        await until(lambda: len(sink.images()) >= n + 5, "idle frames after the speech")

    sink, upstream = asyncio.run(run_pipeline(services.address, script))
    assert upstream.errors == []
    images = sink.images()
    assert {(f.size, f.format) for f in images} == {((256, 224), "RGB")}
    assert all(len(f.image) == 256 * 224 * 3 for f in images)
    generated = sink.generated()
    seconds = len(pcm) / rate
    assert abs(generated - seconds * 25) <= 1, (generated, seconds)
    n16 = round(len(pcm) * 16000 / rate)
    assert generated == clip_frames(padded_clip_length(n16))
    out = sink.audio()
    if rate == 16000:
        np.testing.assert_array_equal(out, pcm)  # exactly the audio in
    else:
        import soxr

        # The exact resampled signal (one shot, float64): within 1 LSB (it rounds).
        want = soxr.resample(pcm.astype(np.float64) / 32768, rate, 16000, quality="HQ") * 32768
        assert len(out) == len(want), (len(out), len(want))
        assert np.abs(out - want).max() <= 1.0
    # Every speaking frame's audio left right after its image (sync_with_audio queues them).
    kinds = [k for k, _ in sink.events if k in ("image", "audio")]
    first_audio = kinds.index("audio")
    assert kinds[first_audio - 1] == "image"
    assert all(f.sync_with_audio for f in images)
    assert not any(f.metadata["lipsync"]["generated"] for f in images[-5:])


def test_an_interruption_stops_the_speech_within_two_frames_and_the_stream_idles(services):
    pcm = tts_audio(24000, 4.0, seed=5)
    after: dict[str, int] = {}

    async def script(worker, sink, _):
        await speak(worker, pcm, 24000)
        await until(lambda: sink.generated() >= 10, "speech frames")
        await worker.queue_frame(InterruptionFrame())
        await until(lambda: any(k == "interruption" for k, _ in sink.events), "the interruption")
        after["events"] = len(sink.events)
        n = len(sink.images())
        await until(lambda: len(sink.images()) >= n + 30, "frames after the interruption")

    sink, upstream = asyncio.run(run_pipeline(services.address, script))
    assert upstream.errors == []
    cut = next(i for i, (k, _) in enumerate(sink.events) if k == "interruption")
    later = [f for k, f in sink.events[cut:] if k == "image"]
    generated_after = [f for f in later if f.metadata["lipsync"]["generated"]]
    assert len(generated_after) <= 2, len(generated_after)
    assert len(later) >= 30 and not any(f.metadata["lipsync"]["generated"] for f in later[2:])
    spoken = sink.generated()
    assert spoken < clip_frames(padded_clip_length(4 * 16000))  # the rest was dropped
    audio_after = sum(len(f.audio) for k, f in sink.events[cut:] if k == "audio")
    assert audio_after <= 2 * 1280


def test_speech_after_an_interruption_is_spoken(services):
    first, second = tts_audio(16000, 3.0, seed=6), tts_audio(16000, 1.0, seed=7)

    async def script(worker, sink, _):
        await speak(worker, first, 16000)
        await until(lambda: sink.generated() >= 5, "speech frames")
        await worker.queue_frame(InterruptionFrame())
        await until(lambda: any(k == "interruption" for k, _ in sink.events), "the interruption")
        sink.events.clear()
        await speak(worker, second, 16000)
        await until(
            lambda: any(f.metadata["lipsync"]["segment_end"] for f in sink.images()),
            "the second utterance's end",
        )

    sink, _ = asyncio.run(run_pipeline(services.address, script))
    np.testing.assert_array_equal(sink.audio()[-len(second) :], second)
    assert abs(sink.generated() - 25) <= 1


def test_an_outage_mid_conversation_gives_held_frames_an_error_and_recovers(
    avatars_root, shared_encoder
):
    """The compositing service stops mid-utterance: an ErrorFrame goes upstream, frames go
    on (the last idle picture) with the rest of the speech, nothing hangs; when it is back
    the avatar speaks again."""
    from compositing_service.server import start as start_compositing

    svc = start_services(service_config(avatars_root, shared_encoder))
    port = svc.compositing.port  # type: ignore[attr-defined]
    pcm = tts_audio(16000, 3.0, seed=8)
    marks: dict[str, int] = {}

    async def script(worker, sink, upstream):
        await speak(worker, pcm, 16000)
        await until(lambda: sink.generated() >= 10, "speech frames")
        await asyncio.to_thread(svc.compositing.stop, 0)  # type: ignore[attr-defined]
        await until(lambda: upstream.errors, "the error frame")
        marks["error"] = len(sink.events)
        await until(
            lambda: sum(f.metadata["lipsync"]["held"] for f in sink.images()) >= 25,
            "held frames",
        )
        svc.compositing = await asyncio.to_thread(  # back, on the same port
            start_compositing, svc.cfg, port, False
        )
        marks["back"] = len(sink.events)
        await until(
            lambda: not any(f.metadata["lipsync"]["held"] for f in sink.images()[-3:]),
            "frames from the service again",
        )
        marks["again"] = len(sink.events)
        await speak(worker, pcm[:16000], 16000)
        await until(
            lambda: any(
                f.metadata["lipsync"]["generated"]
                for k, f in sink.events[marks["again"] :]
                if k == "image"
            ),
            "speech after the outage",
        )

    try:
        sink, upstream = asyncio.run(
            run_pipeline(svc.address, script, session_options={"reconnect_max_s": 0.5})
        )
    finally:
        stop_services(svc)
    assert len(upstream.errors) == 1, [e.error for e in upstream.errors]
    assert "alice" in upstream.errors[0].error
    images = sink.images()
    held = [f for f in images if f.metadata["lipsync"]["held"]]
    assert held and all(f.size == (256, 224) for f in held)
    # The utterance was heard whole: what the service showed, then the rest held here.
    first_utterance = sink.audio()[: len(pcm)]
    np.testing.assert_array_equal(first_utterance, pcm)
    index = [f.metadata["lipsync"]["index"] for f in images]
    assert index == list(range(index[0], index[0] + len(index)))  # one timeline throughout


def test_the_inference_service_stopping_mid_utterance_gives_an_error_and_the_whole_voice(
    avatars_root, shared_encoder
):
    """The compositing service drops a realtime stream's speech when inference fails and
    idles: the avatar reports it upstream and shows the rest of the utterance itself (held
    picture, its audio), so the voice is heard whole; nothing hangs."""
    svc = start_services(service_config(avatars_root, shared_encoder))
    pcm = tts_audio(16000, 3.0, seed=13)

    async def script(worker, sink, upstream):
        await speak(worker, pcm, 16000)
        await until(lambda: sink.generated() >= 5, "speech frames")
        await asyncio.to_thread(svc.inference.stop, 0)  # type: ignore[attr-defined]
        await until(lambda: upstream.errors, "the error frame")
        await until(lambda: len(sink.audio()) >= len(pcm), "the whole utterance")

    try:
        sink, upstream = asyncio.run(run_pipeline(svc.address, script))
    finally:
        stop_services(svc)
    assert len(upstream.errors) == 1 and "dropped" in upstream.errors[0].error
    np.testing.assert_array_equal(sink.audio()[: len(pcm)], pcm)
    assert any(f.metadata["lipsync"]["held"] for f in sink.images())
    index = [f.metadata["lipsync"]["index"] for f in sink.images()]
    assert index == list(range(index[0], index[0] + len(index)))


def test_an_unreachable_service_at_start_passes_the_voice_through():
    from lipsync.local.ports import free_port

    pcm = tts_audio(24000, 0.5, seed=9)

    async def run() -> tuple[Sink, Upstream]:
        avatar = LipsyncVideoService(
            address=f"127.0.0.1:{free_port()}",
            model_id="alice",
            session_options={"connect_timeout_s": 2.0},
        )
        sink, upstream = Sink(), Upstream()
        worker = PipelineWorker(
            Pipeline([upstream, avatar, sink]), enable_rtvi=False, idle_timeout_secs=None
        )
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)

        async def drive() -> None:
            await until(lambda: upstream.errors, "the error frame")
            await speak(worker, pcm, 24000)
            await until(lambda: len(sink.audio()) >= len(pcm), "the voice")
            await worker.queue_frame(EndFrame())

        await asyncio.wait_for(asyncio.gather(runner.run(), drive()), WAIT_S)
        return sink, upstream

    sink, upstream = asyncio.run(run())
    assert len(upstream.errors) == 1 and "voice only" in upstream.errors[0].error
    assert sink.images() == []
    np.testing.assert_array_equal(sink.audio(), pcm)  # unchanged, at its own rate


def test_the_pipecat_example_builds_its_pipeline_without_network():
    out = subprocess.run(
        [sys.executable, "examples/pipecat_agent.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pipeline ok" in out.stdout


def test_the_pipecat_example_speaks_a_wav_through_the_avatar(services, tmp_path):
    """The example's offline mode end to end: every sample of the WAV comes back, with
    the frames that show it."""
    import wave

    pcm = tts_audio(22050, 1.0, seed=12)
    wav = tmp_path / "speech.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(pcm.tobytes())
    out_dir = tmp_path / "out"
    from lipsync.client import LipsyncClient

    with LipsyncClient(services.address) as client:  # loaded, as a deployment preloads
        client.load_model("alice")
    out = subprocess.run(
        [
            sys.executable,
            "examples/pipecat_agent.py",
            "--address",
            services.address,
            "--model",
            "alice",
            "--wav",
            str(wav),
            "--out",
            str(out_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with wave.open(str(out_dir / "audio.wav")) as w:
        assert w.getframerate() == 16000
        got = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    import soxr

    want = soxr.resample(pcm.astype(np.float64) / 32768, 22050, 16000, quality="HQ") * 32768
    assert len(got) == len(want) and np.abs(got - want).max() <= 1.0
    jpegs = sorted(out_dir.glob("*.jpg"))
    assert len(jpegs) >= clip_frames(padded_clip_length(len(want)))  # and idle ones
