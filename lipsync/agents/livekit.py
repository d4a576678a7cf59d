"""The avatar for LiveKit Agents (extra `livekit`; docs/AGENTS.md): both halves of
LiveKit's avatar contract.

The agent side, in the agent's entrypoint:

    from lipsync.agents.livekit import LipsyncAvatarSession

    session = AgentSession(stt=..., llm=..., tts=...)
    avatar = LipsyncAvatarSession(address="localhost:50052", model_id="demo")
    await avatar.start(session, room=ctx.room)     # starts the avatar worker for this room
    await session.start(agent=MyAgent(), room=ctx.room)

`LipsyncAvatarSession.start` mints a room token for the avatar worker (kind `agent`,
`lk.publish_on_behalf` = the agent's identity, as LiveKit's hosted avatar plugins do),
starts the worker (`python -m lipsync.agents.livekit`, a process of its own that joins the
room) and routes the agent's audio to it with `DataStreamAudioOutput`.

The worker: `LipsyncVideoGenerator` (a LiveKit `VideoGenerator`) over a
`RealtimeAvatarSession`, run by LiveKit's `AvatarRunner` with `DataStreamAudioReceiver`:
audio frames in (`push_audio`; `AudioSegmentEnd` ends the utterance), `clear_buffer`
interrupts; out come `rtc.VideoFrame`s at the avatar's fps (idle ones while silent) and,
with each speaking frame, the `rtc.AudioFrame` of the 40 ms it shows (16 kHz mono), then
`AudioSegmentEnd` after an utterance's last frame. The runner counts the audio frames it
publishes, so the agent hears `playback_finished` with the position played and
`interrupted` (true after a clear).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    AvatarSession,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    VideoGenerator,
)

from lipsync.agents.realtime_session import AvatarError, RealtimeAvatarSession
from lipsync.core.audio import SAMPLE_RATE

__all__ = [
    "TOKEN_ENV",
    "LipsyncAvatarSession",
    "LipsyncVideoGenerator",
    "avatar_options",
    "avatar_token",
    "main",
    "run_avatar_worker",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "LIPSYNC_LIVEKIT_TOKEN"  # the worker's room token (kept out of its argv)
DEFAULT_IDENTITY = "lipsync-avatar"


class LipsyncVideoGenerator(VideoGenerator):
    """LiveKit's `VideoGenerator` over a started `RealtimeAvatarSession`."""

    def __init__(self, session: RealtimeAvatarSession):
        self.session = session
        self.errors: list[AvatarError] = []

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.session.end_of_speech()
            return
        self.session.push_audio(bytes(frame.data.cast("B")), frame.sample_rate, frame.num_channels)

    def clear_buffer(self) -> None:
        self.session.interrupt()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for item in self.session.frames():
            if isinstance(item, AvatarError):
                # The frames go on (held picture); LiveKit's generator has no error channel.
                self.errors.append(item)
                log.warning("avatar %s: %s", self.session.model_id, item.message)
                continue
            height, width = item.rgb.shape[:2]
            yield rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, item.rgb.tobytes())
            if item.audio:
                yield rtc.AudioFrame(
                    data=item.audio,
                    sample_rate=SAMPLE_RATE,
                    num_channels=1,
                    samples_per_channel=len(item.audio) // 2,
                )
            if item.segment_end:
                yield AudioSegmentEnd()


def avatar_options(session: RealtimeAvatarSession) -> AvatarOptions:
    """The `AvatarRunner` options of a started session: its size and fps, 16 kHz mono."""
    return AvatarOptions(
        video_width=session.width,
        video_height=session.height,
        video_fps=float(session.fps),
        audio_sample_rate=SAMPLE_RATE,
        audio_channels=1,
    )


def avatar_token(
    api_key: str,
    api_secret: str,
    *,
    room: str,
    identity: str,
    on_behalf_of: str,
    name: str | None = None,
) -> str:
    """The avatar worker's room token: kind `agent`, may join `room`, and publishes on
    behalf of the agent participant `on_behalf_of` (LiveKit shows its tracks as the
    agent's)."""
    return (
        api.AccessToken(api_key=api_key, api_secret=api_secret)
        .with_kind("agent")
        .with_identity(identity)
        .with_name(name or identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: on_behalf_of})
        .to_jwt()
    )


async def run_avatar_worker(
    livekit_url: str,
    token: str,
    *,
    address: str,
    model_id: str,
    session_options: dict[str, Any] | None = None,
) -> None:
    """Join the room, then make the avatar's frames for the agent's audio until the room
    disconnects (or the task is cancelled)."""
    room = rtc.Room()
    session = RealtimeAvatarSession(address, model_id, **(session_options or {}))
    runner: AvatarRunner | None = None
    disconnected = asyncio.Event()
    room.on("disconnected", lambda *_: disconnected.set())
    try:
        await session.start()
        await room.connect(livekit_url, token)
        runner = AvatarRunner(
            room,
            audio_recv=DataStreamAudioReceiver(room),
            video_gen=LipsyncVideoGenerator(session),
            options=avatar_options(session),
        )
        await runner.start()
        done = asyncio.ensure_future(runner.wait_for_complete())
        gone = asyncio.ensure_future(disconnected.wait())
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        for t in (done, gone):
            t.cancel()
    finally:
        if runner is not None:
            await runner.aclose()
        await session.aclose()
        await room.disconnect()


class LipsyncAvatarSession(AvatarSession):
    """The agent side: starts the avatar worker for a room and sends it the agent's audio.

    `livekit_url`, `api_key` and `api_secret` default to `LIVEKIT_URL`,
    `LIVEKIT_API_KEY` and `LIVEKIT_API_SECRET`. `worker_command` replaces the command
    that starts the worker (default: this Python, `-m lipsync.agents.livekit`); the token
    reaches it in `$LIPSYNC_LIVEKIT_TOKEN`.
    """

    def __init__(
        self,
        *,
        address: str = "localhost:50052",
        model_id: str = "demo",
        avatar_identity: str = DEFAULT_IDENTITY,
        livekit_url: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
        worker_command: Sequence[str] | None = None,
    ):
        super().__init__()
        self._address = address
        self._model_id = model_id
        self._identity = avatar_identity
        self._url = livekit_url or os.environ.get("LIVEKIT_URL", "")
        self._api_key = api_key or os.environ.get("LIVEKIT_API_KEY", "")
        self._api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET", "")
        if not (self._url and self._api_key and self._api_secret):
            raise ValueError(
                "LipsyncAvatarSession needs the LiveKit URL, API key and secret "
                "(arguments or LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)"
            )
        self._worker_command = list(worker_command) if worker_command else None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "lipsync"

    def worker_argv(self) -> list[str]:
        """The command that starts the avatar worker (its token goes in the environment)."""
        if self._worker_command is not None:
            return self._worker_command
        return [
            sys.executable,
            "-m",
            "lipsync.agents.livekit",
            "--url",
            self._url,
            "--address",
            self._address,
            "--model",
            self._model_id,
        ]

    async def start(self, agent_session: Any, room: rtc.Room) -> None:  # type: ignore[override]
        await super().start(agent_session, room)
        token = avatar_token(
            self._api_key,
            self._api_secret,
            room=room.name,
            identity=self._identity,
            on_behalf_of=room.local_participant.identity,
        )
        self._process = await asyncio.create_subprocess_exec(
            *self.worker_argv(), env={**os.environ, TOKEN_ENV: token}
        )
        agent_session.output.audio = DataStreamAudioOutput(
            room,
            destination_identity=self._identity,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            sample_rate=SAMPLE_RATE,
        )

    async def aclose(self) -> None:
        await super().aclose()
        proc, self._process = self._process, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def main(argv: list[str] | None = None) -> int:
    """`python -m lipsync.agents.livekit`: the avatar worker for one room."""
    p = argparse.ArgumentParser(
        prog="python -m lipsync.agents.livekit",
        description="Join a LiveKit room as the avatar of its agent: frames of the lipsync "
        f"avatar for the agent's audio. The room token is read from ${TOKEN_ENV}.",
    )
    p.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server URL")
    p.add_argument("--address", default="localhost:50052", help="lipsync compositing service")
    p.add_argument("--model", default="demo", help="avatar (model id)")
    args = p.parse_args(argv)
    token = os.environ.get(TOKEN_ENV)
    if not args.url or not token:
        p.error(f"needs --url (or LIVEKIT_URL) and a room token in ${TOKEN_ENV}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_avatar_worker(args.url, token, address=args.address, model_id=args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
