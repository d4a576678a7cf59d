"""Issue 19: the avatar for LiveKit Agents against the real services on the test avatar
(docs/AGENTS.md).

In-process: LiveKit's own `AvatarRunner` (with its real AV synchronizer and audio/video
sources) runs our `LipsyncVideoGenerator`, fed by LiveKit's local queue audio path
(`QueueAudioOutput`, the agent's side and the runner's receiver in one). Only the room is
a stand-in (`LoopbackRoom`: connected, publishing accepted), since no LiveKit server is
here. A test against a real LiveKit server runs where one is given (`LIVEKIT_URL`,
`LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`) or a `livekit-server` binary is installed, and is
skipped with its reason otherwise. Every wait is bounded; no timing thresholds."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed (make setup)")

from livekit import api, rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput

from lipsync.agents.livekit import (
    TOKEN_ENV,
    LipsyncAvatarSession,
    LipsyncVideoGenerator,
    avatar_options,
    avatar_token,
)
from lipsync.agents.realtime_session import RealtimeAvatarSession
from tests.avatar_factory import speech_like

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0


class _Publication:
    async def wait_for_subscription(self) -> None:
        return None


class _LocalParticipant:
    identity = "agent"

    def __init__(self) -> None:
        self.tracks: list[object] = []

    async def publish_track(self, track: object, options: object) -> _Publication:
        self.tracks.append(track)
        return _Publication()


class LoopbackRoom(rtc.EventEmitter):
    """The part of `rtc.Room` the runner uses, without a server: always connected, every
    track published at once."""

    name = "test-room"

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = _LocalParticipant()

    def isconnected(self) -> bool:
        return True


def tts_pcm(rate: int, seconds: float, seed: int) -> np.ndarray:
    import soxr

    x = soxr.resample(speech_like(seconds, seed=seed), 16000, rate, quality="HQ")
    return np.clip(np.rint(np.asarray(x) * 32768), -32768, 32767).astype(np.int16)


async def until(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Harness:
    """Session + generator + AvatarRunner + QueueAudioOutput; records what the runner
    pushes to its AV synchronizer and the playback events the agent side hears."""

    def __init__(self, address: str):
        self.address = address
        self.pushed: list[object] = []
        self.finished: list[object] = []

    async def __aenter__(self) -> Harness:
        self.session = RealtimeAvatarSession(self.address, "alice")
        await self.session.start()
        self.audio_out = QueueAudioOutput(sample_rate=24000)
        self.audio_out.on("playback_finished", self.finished.append)
        self.runner = AvatarRunner(
            LoopbackRoom(),  # type: ignore[arg-type]
            audio_recv=self.audio_out,
            video_gen=LipsyncVideoGenerator(self.session),
            options=avatar_options(self.session),
        )
        push = self.runner.av_sync.push

        async def record(frame, *args, **kwargs):
            self.pushed.append(frame)
            return await push(frame, *args, **kwargs)

        self.runner.av_sync.push = record  # type: ignore[method-assign]
        await self.runner.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.aclose()
        await self.session.aclose()

    async def say(self, pcm: np.ndarray, rate: int, flush: bool = True) -> None:
        step = rate // 50  # 20 ms frames, as an agent's TTS gives them
        for i in range(0, len(pcm), step):
            c = pcm[i : i + step]
            await self.audio_out.capture_frame(rtc.AudioFrame(c.tobytes(), rate, 1, len(c)))
        if flush:
            self.audio_out.flush()

    def audio(self, start: int = 0) -> np.ndarray:
        data = b"".join(
            bytes(f.data.cast("B")) for f in self.pushed[start:] if isinstance(f, rtc.AudioFrame)
        )
        return np.frombuffer(data, np.int16)

    def speaking_video_frames(self, start: int = 0) -> int:
        seq = self.pushed[start:]
        return sum(
            1
            for a, b in itertools.pairwise(seq)
            if isinstance(a, rtc.VideoFrame) and isinstance(b, rtc.AudioFrame)
        )


def test_an_utterance_through_the_avatar_runner(services):
    pcm = tts_pcm(24000, 2.0, seed=31)

    async def run() -> Harness:
        async with Harness(services.address) as h:
            await until(lambda: len(h.pushed) >= 3, "idle frames")
            assert not any(isinstance(f, rtc.AudioFrame) for f in h.pushed)  # silent idling
            await h.say(pcm, 24000)
            await until(lambda: h.finished, "playback finished")
            n = len(h.pushed)
            await until(lambda: len(h.pushed) >= n + 5, "idle frames after")
        return h

    h = asyncio.run(run())
    video = [f for f in h.pushed if isinstance(f, rtc.VideoFrame)]
    assert {(f.width, f.height) for f in video} == {(256, 224)}
    n16 = len(pcm) * 16000 // 24000
    # Audio out: the agent's audio at 16 kHz, within 1 LSB of the exact resampling.
    import soxr

    out = h.audio()
    want = soxr.resample(pcm.astype(np.float64) / 32768, 24000, 16000, quality="HQ") * 32768
    assert len(out) == len(want) == n16
    assert np.abs(out - want).max() <= 1.0
    # Frames: one per 40 ms of speech, each followed by its audio (in sync).
    speaking = h.speaking_video_frames()
    assert speaking == math.ceil(n16 / 640)
    assert abs(speaking - 2.0 * 25) <= 1
    # The agent hears the position played, not interrupted.
    assert len(h.finished) == 1
    ev = h.finished[0]
    assert not ev.interrupted  # type: ignore[attr-defined]
    assert ev.playback_position == pytest.approx(n16 / 16000, abs=1e-6)  # type: ignore[attr-defined]


def test_clear_buffer_interrupts_within_two_frames_and_reports_the_position(services):
    pcm = tts_pcm(24000, 4.0, seed=32)
    marks: dict[str, int] = {}

    async def run() -> Harness:
        async with Harness(services.address) as h:
            await until(lambda: len(h.pushed) >= 3, "idle frames")
            await h.say(pcm, 24000, flush=False)
            await until(lambda: len(h.audio()) >= 10 * 640, "speech")
            marks["clear"] = len(h.pushed)
            h.audio_out.clear_buffer()
            await until(lambda: h.finished, "playback finished (interrupted)")
            marks["event"] = len(h.pushed)
            await until(lambda: len(h.pushed) >= marks["event"] + 30, "frames after")
        return h

    h = asyncio.run(run())
    assert len(h.finished) == 1
    ev = h.finished[0]
    assert ev.interrupted  # type: ignore[attr-defined]
    # The position is what had been pushed (played) when the runner reported it.
    played = sum(
        f.samples_per_channel for f in h.pushed[: marks["event"]] if isinstance(f, rtc.AudioFrame)
    )
    assert ev.playback_position == pytest.approx(played / 16000, abs=2 * 0.04)  # type: ignore[attr-defined]
    after = [f for f in h.pushed[marks["clear"] :] if isinstance(f, rtc.AudioFrame)]
    assert len(after) <= 2
    assert sum(isinstance(f, rtc.VideoFrame) for f in h.pushed[marks["event"] :]) >= 30
    assert h.speaking_video_frames(marks["event"]) == 0
    assert len(h.audio()) < len(pcm) * 16000 // 24000  # the rest was dropped


def test_the_generator_ends_each_segment_after_its_last_frame(services):
    """Two utterances: an AudioSegmentEnd after each one's last audio frame."""

    async def run() -> list[object]:
        session = RealtimeAvatarSession(services.address, "alice")
        await session.start()
        gen = LipsyncVideoGenerator(session)
        got: list[object] = []

        async def collect() -> None:
            async for item in gen:
                got.append(item)
                if sum(isinstance(x, AudioSegmentEnd) for x in got) == 2:
                    return

        task = asyncio.create_task(collect())
        for seed in (41, 42):
            pcm = tts_pcm(16000, 0.6, seed)
            for i in range(0, len(pcm), 320):
                c = pcm[i : i + 320]
                await gen.push_audio(rtc.AudioFrame(c.tobytes(), 16000, 1, len(c)))
            await gen.push_audio(AudioSegmentEnd())
        await asyncio.wait_for(task, WAIT_S)
        await session.aclose()
        return got

    got = asyncio.run(run())
    ends = [i for i, x in enumerate(got) if isinstance(x, AudioSegmentEnd)]
    assert len(ends) == 2
    for end in ends:
        # After the utterance's last audio, at most its two padding frames (video only).
        last_audio = max(i for i, x in enumerate(got[:end]) if isinstance(x, rtc.AudioFrame))
        between = got[last_audio + 1 : end]
        assert len(between) <= 2 and all(isinstance(x, rtc.VideoFrame) for x in between)
    first = sum(f.samples_per_channel for f in got[: ends[0]] if isinstance(f, rtc.AudioFrame))
    assert first == len(tts_pcm(16000, 0.6, 41))


def test_the_avatar_token_publishes_on_behalf_of_the_agent():
    token = avatar_token(
        "key", "secret-secret-secret-secret-1234", room="r1", identity="av", on_behalf_of="ag"
    )
    claims = api.TokenVerifier("key", "secret-secret-secret-secret-1234").verify(token)
    assert claims.identity == "av" and claims.kind == "agent"
    assert claims.video.room == "r1" and claims.video.room_join
    assert claims.attributes == {"lk.publish_on_behalf": "ag"}


def test_the_avatar_session_needs_livekit_credentials(monkeypatch):
    for var in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="LIVEKIT_URL"):
        LipsyncAvatarSession()
    s = LipsyncAvatarSession(livekit_url="ws://x", api_key="k", api_secret="s", model_id="m")
    assert s.avatar_identity == "lipsync-avatar" and s.provider == "lipsync"
    argv = s.worker_argv()
    assert argv[1:3] == ["-m", "lipsync.agents.livekit"] and "m" in argv


def test_the_worker_refuses_to_start_without_a_token():
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "LIVEKIT_URL")}
    out = subprocess.run(
        [sys.executable, "-m", "lipsync.agents.livekit", "--url", "ws://127.0.0.1:1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and TOKEN_ENV in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["examples/livekit_agent/avatar_worker.py", "--help"],
        ["examples/livekit_agent/agent.py", "--check"],
    ],
)
def test_the_livekit_examples_start(argv):
    out = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]


# -- against a real LiveKit server ----------------------------------------------------------
def livekit_server() -> tuple[str, str, str] | str:
    """(url, key, secret) of a LiveKit server to test against, or why there is none."""
    url, key, secret = (
        os.environ.get(v) for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
    )
    if url and key and secret:
        return url, key, secret
    if shutil.which("livekit-server"):
        return "dev"
    return (
        "no LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET, or "
        "install the livekit-server binary (it is not on PyPI or Debian)"
    )


@pytest.mark.slow
def test_against_a_real_livekit_server(services, tmp_path):
    server = livekit_server()
    if isinstance(server, str) and server != "dev":
        pytest.skip(server)
    proc = None
    if server == "dev":  # `livekit-server --dev`: keys devkey / secret, on loopback
        proc = subprocess.Popen(
            ["livekit-server", "--dev", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url, key, secret = "ws://127.0.0.1:7880", "devkey", "secret"
    else:
        url, key, secret = server  # type: ignore[misc]
    try:
        asyncio.run(_real_server_conversation(url, key, secret, services.address))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


async def _real_server_conversation(url: str, key: str, secret: str, address: str) -> None:
    """The agent joins, starts the worker (a process) with an on-behalf token, streams an
    utterance to it over DataStream and hears playback_finished with its length."""
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    room_name = f"lipsync-test-{os.getpid()}"
    agent_token = (
        api.AccessToken(key, secret)
        .with_identity("agent")
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    room = rtc.Room()
    deadline = time.monotonic() + WAIT_S
    for _ in range(50):  # the dev server may still be starting
        try:
            await room.connect(url, agent_token)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    token = avatar_token(
        key, secret, room=room_name, identity="lipsync-avatar", on_behalf_of="agent"
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lipsync.agents.livekit",
        "--url",
        url,
        "--address",
        address,
        "--model",
        "alice",
        env={**os.environ, TOKEN_ENV: token},
        cwd=REPO,
    )
    finished: list[object] = []
    try:
        out = DataStreamAudioOutput(
            room, destination_identity="lipsync-avatar", wait_remote_track=rtc.TrackKind.KIND_VIDEO
        )
        out.on("playback_finished", finished.append)
        pcm = tts_pcm(24000, 1.0, seed=50)
        for i in range(0, len(pcm), 480):
            c = pcm[i : i + 480]
            await out.capture_frame(rtc.AudioFrame(c.tobytes(), 24000, 1, len(c)))
        out.flush()
        await until(lambda: finished, "playback finished from the avatar worker")
        ev = finished[0]
        assert not ev.interrupted  # type: ignore[attr-defined]
        assert ev.playback_position == pytest.approx(1.0, abs=1e-3)  # type: ignore[attr-defined]
        avatar = room.remote_participants.get("lipsync-avatar")
        assert avatar is not None and any(
            p.kind == rtc.TrackKind.KIND_VIDEO for p in avatar.track_publications.values()
        )
    finally:
        worker.terminate()
        await asyncio.wait_for(worker.wait(), 20)
        await room.disconnect()
