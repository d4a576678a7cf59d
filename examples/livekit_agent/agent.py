"""A LiveKit voice agent with the lipsync avatar's face (README.md beside this file).

    python examples/livekit_agent/agent.py dev      # LiveKit Agents' CLI: dev, start, ...
    python examples/livekit_agent/agent.py --check  # build the agent's parts and exit

Needs LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET and the lipsync services (`make
run`). STT, LLM and TTS are LiveKit Inference model strings (LIPSYNC_STT, LIPSYNC_LLM,
LIPSYNC_TTS; any TTS LiveKit offers, or a plugin object in `make_session`); they run on
LiveKit Cloud with the same credentials. LIPSYNC_ADDRESS and LIPSYNC_MODEL pick the
avatar (default localhost:50052, demo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

from lipsync.agents.livekit import LipsyncAvatarSession

ADDRESS = os.environ.get("LIPSYNC_ADDRESS", "localhost:50052")
MODEL = os.environ.get("LIPSYNC_MODEL", "demo")

server = AgentServer()


def make_session() -> AgentSession:
    return AgentSession(
        stt=os.environ.get("LIPSYNC_STT", "deepgram/nova-3"),
        llm=os.environ.get("LIPSYNC_LLM", "openai/gpt-4.1-mini"),
        tts=os.environ.get("LIPSYNC_TTS", "cartesia/sonic-3"),
    )


def make_avatar() -> LipsyncAvatarSession:
    return LipsyncAvatarSession(address=ADDRESS, model_id=MODEL)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = make_session()
    avatar = make_avatar()
    # Starts the avatar worker (avatar_worker.py's code, in its own process) for this
    # room and sends it the agent's audio; the avatar publishes video and audio on the
    # agent's behalf.
    await avatar.start(session, room=ctx.room)
    await session.start(
        agent=Agent(instructions="You are a friendly assistant. Answer in a sentence or two."),
        room=ctx.room,
    )
    await session.generate_reply(instructions="Greet the user.")


def check() -> int:
    """Build the agent's parts without connecting anywhere."""
    for var, value in (
        ("LIVEKIT_URL", "ws://127.0.0.1:7880"),
        ("LIVEKIT_API_KEY", "check"),
        ("LIVEKIT_API_SECRET", "check"),
    ):
        os.environ.setdefault(var, value)
    session = make_session()
    print(
        "agent session:",
        type(session.stt).__name__,
        type(session.llm).__name__,
        type(session.tts).__name__,
    )
    avatar = make_avatar()
    print("avatar worker:", " ".join(avatar.worker_argv()))
    print("agent ok")
    return 0


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(check())
    cli.run_app(server)
