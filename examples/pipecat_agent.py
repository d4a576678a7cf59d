"""A pipecat bot with the lipsync avatar's face (docs/AGENTS.md).

The avatar goes right after the TTS service:

    pipeline = Pipeline([transport.input(), stt, context.user(), llm, tts,
                         LipsyncVideoService(address=..., model_id="demo"),
                         transport.output(), context.assistant()])

Three ways to run it (the services first: `make run`, or `python -m lipsync.local.launch`):

    python examples/pipecat_agent.py --check
        Build the pipeline and exit (no network): the example starts.

    python examples/pipecat_agent.py --out out/pipecat
        Offline, no keys: a "TTS" that speaks assets/speech/demo.wav through the avatar;
        the frames (JPEG) and the audio (WAV) the transport would get land in --out.

    python examples/pipecat_agent.py --webrtc [--tts cartesia|openai]
        A voice agent in the browser over pipecat's WebRTC transport (SmallWebRTC; open
        the printed URL): Deepgram STT, OpenAI LLM, the chosen TTS, the avatar.
        Needs `pip install "pipecat-ai[webrtc,deepgram,openai,cartesia,runner]"` and
        DEEPGRAM_API_KEY, OPENAI_API_KEY (and CARTESIA_API_KEY for cartesia). pipecat
        has no offline TTS whose voice ships in a package (Piper and Kokoro download
        theirs): any other pipecat TTS service drops in where `make_tts` builds one.

`--address` (default localhost:50052) and `--model` (default demo) pick the avatar.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import wave
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pipecat.frames.frames import (  # noqa: E402
    EndWorkerFrame,
    Frame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

from lipsync.agents.pipecat import LipsyncVideoService  # noqa: E402

DEMO_WAV = REPO / "assets" / "speech" / "demo.wav"


class WavFileTTS(FrameProcessor):
    """Stands where a TTS service would: on start, speaks a WAV file as TTS frames (20 ms
    chunks at the file's rate), then ends the pipeline once the avatar has shown it."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._speak(), name="wav-tts")

    async def _speak(self) -> None:
        with wave.open(str(self.path)) as w:
            rate, channels = w.getframerate(), w.getnchannels()
            if w.getsampwidth() != 2:
                raise SystemExit(f"{self.path}: 16-bit PCM WAV expected")
            pcm = w.readframes(w.getnframes())
        await asyncio.sleep(0.5)  # a moment of idling first
        await self.push_frame(TTSStartedFrame())
        step = rate // 50 * 2 * channels
        for i in range(0, len(pcm), step):
            await self.push_frame(TTSAudioRawFrame(pcm[i : i + step], rate, channels))
        await self.push_frame(TTSStoppedFrame())
        # Ask the pipeline to end: its EndFrame waits in the avatar until all is shown.
        await self.push_frame(EndWorkerFrame())


class FrameWriter(FrameProcessor):
    """Stands where the output transport would: JPEG per image, one WAV of the audio."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out
        self.images = 0
        self.audio = bytearray()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            from PIL import Image

            Image.frombytes("RGB", frame.size, frame.image).save(
                self.out / f"{self.images:05d}.jpg", quality=90
            )
            self.images += 1
        elif isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
        await self.push_frame(frame, direction)

    def write_audio(self) -> Path:
        path = self.out / "audio.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)  # the avatar's audio out
            w.writeframes(bytes(self.audio))
        return path


def offline_pipeline(args: argparse.Namespace) -> tuple[Pipeline, FrameWriter]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = FrameWriter(out)
    avatar = LipsyncVideoService(address=args.address, model_id=args.model)
    return Pipeline([WavFileTTS(Path(args.wav)), avatar, writer]), writer


async def run_offline(args: argparse.Namespace) -> None:
    from pipecat.workers.runner import WorkerRunner

    pipeline, writer = offline_pipeline(args)
    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(PipelineWorker(pipeline, enable_rtvi=False, idle_timeout_secs=60))
    await runner.run()
    wav = writer.write_audio()
    print(f"{writer.images} frames in {writer.out}, audio in {wav}")


# -- the WebRTC voice agent ----------------------------------------------------------------
def make_tts(name: str):
    """The TTS service (any pipecat TTS works here)."""
    if name == "cartesia":
        from pipecat.services.cartesia.tts import CartesiaTTSService

        return CartesiaTTSService(
            api_key=os.environ["CARTESIA_API_KEY"],
            voice_id=os.environ.get("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121"),
        )
    if name == "openai":
        from pipecat.services.openai.tts import OpenAITTSService

        return OpenAITTSService(api_key=os.environ["OPENAI_API_KEY"])
    raise SystemExit(f"unknown --tts {name!r}")


async def bot(runner_args) -> None:
    """pipecat's development runner calls this for each browser that connects."""
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.runner.utils import create_transport
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.transports.base_transport import TransportParams
    from pipecat.workers.runner import WorkerRunner

    from lipsync.client import LipsyncClient

    address, model = os.environ["LIPSYNC_ADDRESS"], os.environ["LIPSYNC_MODEL"]
    with LipsyncClient(address) as client:
        client.load_model(model)
        info = next(m for m in client.list_models() if m.model_id == model)
    transport = await create_transport(
        runner_args,
        {
            "webrtc": lambda: TransportParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                video_out_enabled=True,
                video_out_is_live=True,
                video_out_width=info.frame_width,
                video_out_height=info.frame_height,
                video_out_framerate=info.fps or 25,
            )
        },
    )
    context = LLMContext(
        [{"role": "system", "content": "You are a friendly assistant. Answer briefly."}]
    )
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline(
        [
            transport.input(),
            DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"]),
            aggregators.user(),
            OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"]),
            make_tts(os.environ.get("LIPSYNC_TTS", "cartesia")),
            LipsyncVideoService(address=address, model_id=model),
            transport.output(),
            aggregators.assistant(),
        ]
    )
    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(PipelineWorker(pipeline))
    await runner.run()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--address", default="localhost:50052", help="lipsync compositing service")
    p.add_argument("--model", default="demo", help="avatar (model id)")
    p.add_argument("--check", action="store_true", help="build the pipeline and exit")
    p.add_argument("--out", default="out/pipecat", help="offline mode: where frames go")
    p.add_argument("--wav", default=str(DEMO_WAV), help="offline mode: the speech")
    p.add_argument("--webrtc", action="store_true", help="a voice agent over WebRTC")
    p.add_argument("--tts", default="cartesia", help="WebRTC mode: cartesia or openai")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.check:
        pipeline, _ = offline_pipeline(args)
        print("pipeline ok:", " -> ".join(type(p).__name__ for p in pipeline.processors))
        return 0
    if args.webrtc:
        from pipecat.runner.run import main as runner_main

        os.environ.update(
            LIPSYNC_ADDRESS=args.address, LIPSYNC_MODEL=args.model, LIPSYNC_TTS=args.tts
        )
        sys.argv = [sys.argv[0], *rest]  # the runner's own options (--host, --port, ...)
        runner_main()
        return 0
    asyncio.run(run_offline(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
