"""The avatar as a pipecat video service (extra `pipecat`; docs/AGENTS.md).

    from lipsync.agents.pipecat import LipsyncVideoService

    avatar = LipsyncVideoService(address="localhost:50052", model_id="demo")
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, avatar,
                         transport.output(), assistant_agg])

Placed after the TTS service, like pipecat's own avatar services (Simli, Tavus, HeyGen):
it takes the TTS audio (`TTSAudioRawFrame`, any rate) and emits, at the avatar's fps,
`OutputImageRawFrame`s (RGB, the avatar's size) and, with each speaking frame, the
`TTSAudioRawFrame` of the 40 ms it shows (16 kHz mono; the output transport resamples
to its rate). Idle frames come while the bot is silent. Images are queued with the audio
(`sync_with_audio`), so the transport shows each one as its sound starts.

`InterruptionFrame` or `UserStartedSpeakingFrame` interrupts (the speech not shown yet
is dropped); `TTSStoppedFrame` ends the utterance (its last frames are made at once); an
`EndFrame` waits (bounded) for the speech pushed to be shown, then closes the session.
If the lipsync service fails mid-conversation an `ErrorFrame` goes upstream and the
avatar idles with the last picture while the voice goes on; it reconnects by itself. If
it cannot be reached at start, the error goes upstream and the TTS audio passes through
unchanged (voice only).

Each emitted image's `metadata["lipsync"]` holds the frame's index and flags (generated,
speech, held, segment_end). TTFB metrics: from an utterance's first audio in to its
first generated frame out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from lipsync.agents.realtime_session import AvatarError, AvatarFrame, RealtimeAvatarSession
from lipsync.client import LipsyncError
from lipsync.core.audio import SAMPLE_RATE

__all__ = ["LipsyncVideoService"]


class LipsyncVideoService(AIService):
    """A pipecat processor that gives the bot the avatar's face (see the module doc)."""

    def __init__(
        self,
        *,
        address: str = "localhost:50052",
        model_id: str = "demo",
        end_timeout_s: float = 30.0,
        session_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """`session_options` go to `RealtimeAvatarSession` (api_key, ca_file, queue_frames,
        reconnect_min_s, ...); `end_timeout_s` bounds how long an `EndFrame` waits for the
        speech pushed to be shown."""
        kwargs.setdefault("settings", ServiceSettings(model=None))  # no model to choose
        super().__init__(**kwargs)
        self._address = address
        self._model_id = model_id
        self._end_timeout_s = end_timeout_s
        self._session_options = session_options or {}
        self._session: RealtimeAvatarSession | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._awaiting_first_frame = False

    @property
    def session(self) -> RealtimeAvatarSession | None:
        """The open session (None before start, after stop, or when it could not open)."""
        return self._session

    def can_generate_metrics(self) -> bool:
        return True

    # -- life cycle ----------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        session = RealtimeAvatarSession(self._address, self._model_id, **self._session_options)
        try:
            await session.start()
        except LipsyncError as exc:
            await self.push_error(
                f"lipsync avatar {self._model_id!r} at {self._address}: {exc}; voice only",
                exception=exc,
            )
            return
        self._session = session
        self._pump_task = self.create_task(self._pump(session), name="lipsync-frames")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        if self._session is not None:
            self._session.end_of_speech()
            await self._session.wait_spoken(self._end_timeout_s)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.aclose()
        if self._pump_task is not None:
            await self.cancel_task(self._pump_task, timeout=5.0)
            self._pump_task = None

    # -- frames --------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        session = self._session
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if session is None:  # voice only
                await self.push_frame(frame, direction)
                return
            if not self._awaiting_first_frame and not session.pending_speech:
                self._awaiting_first_frame = True
                await self.start_ttfb_metrics()
            session.push_audio(frame.audio, frame.sample_rate, frame.num_channels)
            return  # its sound leaves with the frames that show it
        if isinstance(frame, TTSStoppedFrame) and session is not None:
            session.end_of_speech()
        elif isinstance(frame, InterruptionFrame | UserStartedSpeakingFrame) and session:
            session.interrupt()
            if self._awaiting_first_frame:
                self._awaiting_first_frame = False
                await self.stop_ttfb_metrics()
        await self.push_frame(frame, direction)

    async def _pump(self, session: RealtimeAvatarSession) -> None:
        async for item in session.frames():
            if isinstance(item, AvatarError):
                await self.push_error(f"lipsync avatar {self._model_id!r}: {item.message}")
                continue
            await self._push_avatar_frame(item)

    async def _push_avatar_frame(self, f: AvatarFrame) -> None:
        height, width = f.rgb.shape[:2]
        image = OutputImageRawFrame(image=f.rgb.tobytes(), size=(width, height), format="RGB")
        image.sync_with_audio = True
        image.metadata["lipsync"] = {
            "index": f.index,
            "generated": f.generated,
            "speech": f.speech,
            "held": f.held,
            "segment_end": f.segment_end,
            "received_s": f.received_s,  # time.monotonic() it arrived from the service
        }
        if f.generated and self._awaiting_first_frame:
            self._awaiting_first_frame = False
            await self.stop_ttfb_metrics()
        await self.push_frame(image)
        if f.audio:
            await self.push_frame(
                TTSAudioRawFrame(audio=f.audio, sample_rate=SAMPLE_RATE, num_channels=1)
            )
