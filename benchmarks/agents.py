"""What each hop of the voice-agent integrations adds (docs/AGENTS.md).

For each path, `--utterances` times: 2 s of speech pushed as a TTS does (20 ms chunks, as
fast as it makes them), then the end of the utterance; measured from the first chunk
pushed to the first generated (speaking) frame out of that path:

- bare:     `LipsyncClient.open_stream` (realtime, return_audio): the service alone;
- session:  `RealtimeAvatarSession` (resampling, JPEG decode to RGB, thread -> asyncio);
- pipecat:  a pipecat pipeline [LipsyncVideoService, sink]: TTSAudioRawFrame in ->
            OutputImageRawFrame at the sink (24 kHz TTS audio);
- livekit:  `LipsyncVideoGenerator.push_audio(rtc.AudioFrame)` (24 kHz) -> the first
            rtc.VideoFrame that carries speech out of the generator.

These first-frame times are dominated by where the service places the clip on its 40 ms
timeline (the speech arrives all at once, so the windows' lookahead is met at once), so
the hops are measured per frame too: from a frame's arrival from the service (the gRPC
message, before decoding) to the session's `frames()`, and to a pipecat processor after
the avatar service; for LiveKit, the cost of the rtc frame objects the generator adds.

Also: the client-side CPU per frame of a session (decode and gRPC; `time.process_time`
of this process, the services run in their own) and Pillow's JPEG decode of one frame.

`python -m benchmarks.agents [--model demo] [--utterances 5]`; writes out/agents.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.run import cpu_name
from lipsync.agents.realtime_session import AvatarFrame, RealtimeAvatarSession, decode_jpeg_rgb
from lipsync.avatars.speech_signal import speech_like
from lipsync.client import LipsyncClient, to_pcm16
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port

SECONDS = 2.0


def speech(rate: int, seed: int) -> np.ndarray:
    import soxr

    x = speech_like(SECONDS, seed=seed)
    if rate != 16000:
        x = soxr.resample(x, 16000, rate, quality="HQ")
    return to_pcm16(np.asarray(x, np.float32))


def chunks(pcm: np.ndarray, rate: int) -> list[np.ndarray]:
    step = rate // 50
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def bare(address: str, model: str, n: int) -> list[float]:
    out: list[float] = []
    with LipsyncClient(address) as client:
        live = client.open_stream(model, realtime=True, return_audio=True)
        first_speech = threading.Event()
        stop = threading.Event()

        def read() -> None:
            for f in live:
                if f.generated:
                    first_speech.set()
                if stop.is_set():
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(1.0)
        for k in range(n):
            first_speech.clear()
            t0 = time.monotonic()
            for c in chunks(speech(16000, k), 16000):
                live.send_audio(c)
            live.end_of_audio()
            first_speech.wait(30)
            out.append((time.monotonic() - t0) * 1000)
            time.sleep(SECONDS + 1.0)
        stop.set()
        live.cancel()
        reader.join(5)
    return out


async def session_path(address: str, model: str, n: int) -> tuple[list[float], dict]:
    s = RealtimeAvatarSession(address, model)
    await s.start()
    out: list[float] = []
    frames = 0
    cpu0, wall0 = time.process_time(), time.monotonic()
    it = s.frames().__aiter__()
    hops: list[float] = []

    async def next_frame() -> AvatarFrame:
        nonlocal frames
        f = await asyncio.wait_for(it.__anext__(), 30)
        assert isinstance(f, AvatarFrame), f
        hops.append((time.monotonic() - f.received_s) * 1000)
        frames += 1
        return f

    for k in range(n):
        t0 = time.monotonic()
        for c in chunks(speech(24000, k), 24000):
            s.push_audio(c, 24000)
        s.end_of_speech()
        while not (await next_frame()).generated:
            pass
        out.append((time.monotonic() - t0) * 1000)
        end = time.monotonic() + SECONDS + 1.0
        while time.monotonic() < end:
            await next_frame()
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    await s.aclose()
    return out, {"frames": frames, "cpu_s": cpu, "wall_s": wall, "hop_ms": hops}


async def pipecat_path(address: str, model: str, n: int) -> tuple[list[float], list[float]]:
    from pipecat.frames.frames import (
        EndFrame,
        OutputImageRawFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from lipsync.agents.pipecat import LipsyncVideoService

    first = asyncio.Event()
    hops: list[float] = []

    class Sink(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, OutputImageRawFrame):
                meta = frame.metadata["lipsync"]
                hops.append((time.monotonic() - meta["received_s"]) * 1000)
                if meta["generated"]:
                    first.set()
            await self.push_frame(frame, direction)

    worker = PipelineWorker(
        Pipeline([LipsyncVideoService(address=address, model_id=model), Sink()]),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    out: list[float] = []

    async def drive() -> None:
        await asyncio.sleep(1.5)
        for k in range(n):
            first.clear()
            t0 = time.monotonic()
            await worker.queue_frame(TTSStartedFrame())
            for c in chunks(speech(24000, k), 24000):
                await worker.queue_frame(TTSAudioRawFrame(c.tobytes(), 24000, 1))
            await worker.queue_frame(TTSStoppedFrame())
            await asyncio.wait_for(first.wait(), 30)
            out.append((time.monotonic() - t0) * 1000)
            await asyncio.sleep(SECONDS + 1.0)
        await worker.queue_frame(EndFrame())

    await asyncio.wait_for(asyncio.gather(runner.run(), drive()), 120)
    return out, hops


async def livekit_path(address: str, model: str, n: int) -> list[float]:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd

    from lipsync.agents.livekit import LipsyncVideoGenerator

    s = RealtimeAvatarSession(address, model)
    await s.start()
    gen = LipsyncVideoGenerator(s)
    it = gen.__aiter__()
    out: list[float] = []
    for k in range(n):
        t0 = time.monotonic()
        for c in chunks(speech(24000, k), 24000):
            await gen.push_audio(rtc.AudioFrame(c.tobytes(), 24000, 1, len(c)))
        await gen.push_audio(AudioSegmentEnd())
        while not isinstance(await asyncio.wait_for(it.__anext__(), 30), rtc.AudioFrame):
            pass
        out.append((time.monotonic() - t0) * 1000)  # the audio right after its frame
        end = time.monotonic() + SECONDS + 1.0
        while time.monotonic() < end:
            await asyncio.wait_for(it.__anext__(), 30)
    await s.aclose()
    return out


def livekit_frame_ms(rgb: np.ndarray) -> float:
    """What the generator adds per frame: an rtc.VideoFrame and rtc.AudioFrame made."""
    from livekit import rtc

    audio = bytes(1280)
    h, w = rgb.shape[:2]
    t0 = time.perf_counter()
    for _ in range(200):
        rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, rgb.tobytes())
        rtc.AudioFrame(data=audio, sample_rate=16000, num_channels=1, samples_per_channel=640)
    return (time.perf_counter() - t0) / 200 * 1000


def decode_ms(address: str, model: str) -> tuple[float, tuple[int, int], np.ndarray]:
    with LipsyncClient(address) as client:
        jpeg = next(iter(client.render(model, np.zeros(16000, np.float32))))
    rgb = decode_jpeg_rgb(jpeg)
    t0 = time.perf_counter()
    for _ in range(200):
        decode_jpeg_rgb(jpeg)
    return (time.perf_counter() - t0) / 200 * 1000, (rgb.shape[1], rgb.shape[0]), rgb


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def percentiles(xs: list[float]) -> dict:
    q = np.percentile(xs, [50, 95])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "n": len(xs)}


def summary(xs: list[float]) -> dict:
    return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs), "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.agents", description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--utterances", type=int, default=5)
    ap.add_argument("--out", default="out/agents.json")
    args = ap.parse_args(argv)
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    results: dict[str, dict] = {}
    with ServiceProcesses(
        env=env, inference_port=free_port(), compositing_port=free_port(), quiet=True
    ) as services:
        address, n = services.address, args.utterances
        progress("bare stream")
        bare(address, args.model, 1)  # warm up
        results["bare"] = summary(bare(address, args.model, n))
        progress("session")
        lat, cpu = asyncio.run(session_path(address, args.model, n))
        results["session"] = summary(lat)
        progress("pipecat")
        pipecat_first, pipecat_hops = asyncio.run(pipecat_path(address, args.model, n))
        results["pipecat"] = summary(pipecat_first)
        progress("livekit")
        results["livekit"] = summary(asyncio.run(livekit_path(address, args.model, n)))
        progress("decode")
        dec, size, rgb = decode_ms(address, args.model)
        progress("stopping the services")
    lk_ms = livekit_frame_ms(rgb)
    hops = {
        "session": percentiles(cpu["hop_ms"]),
        "pipecat": percentiles(pipecat_hops),
        "livekit_frame_objects_ms": lk_ms,
    }
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": "python -m benchmarks.agents " + " ".join(argv or []),
        "model": args.model,
        "frame_size": size,
        "first_speech_frame": results,
        "hop_after_the_service": hops,
        "jpeg_decode_ms": dec,
        "client_cpu_ms_per_frame": cpu["cpu_s"] / cpu["frames"] * 1000,
        "client_cpu_share_of_one_core": cpu["cpu_s"] / cpu["wall_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"== agents, {report['date']}, {report['machine']}, model {args.model} {size} ==")
    print("first speech frame after the first audio pushed (ms): median  min  max")
    base = results["bare"]["median_ms"]
    for name, r in results.items():
        extra = "" if name == "bare" else f"   (+{r['median_ms'] - base:.0f} ms vs bare)"
        print(f"  {name:8} {r['median_ms']:7.0f} {r['min_ms']:5.0f} {r['max_ms']:5.0f}{extra}")
    print("each frame, from its arrival from the service (ms): p50  p95")
    print(
        f"  to the session's frames()      {hops['session']['p50_ms']:6.2f} "
        f"{hops['session']['p95_ms']:6.2f}   ({hops['session']['n']} frames)"
    )
    print(
        f"  to a pipecat sink after it     {hops['pipecat']['p50_ms']:6.2f} "
        f"{hops['pipecat']['p95_ms']:6.2f}   ({hops['pipecat']['n']} frames)"
    )
    print(f"  + LiveKit frame objects        {lk_ms:6.2f}")
    print(f"JPEG -> RGB (Pillow), one frame: {dec:.2f} ms")
    print(
        f"session, client side: {report['client_cpu_ms_per_frame']:.2f} ms CPU a frame, "
        f"{100 * report['client_cpu_share_of_one_core']:.1f}% of one core"
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
