"""Streaming latency: audio fed at real time into StreamComposite (realtime mode), for one
stream and for several at once.

- first-frame latency: from sending a clip's first audio to receiving its first frame;
- steady-state latency: for each speech frame, from sending the audio sample the frame
  shows (clip time 40 ms x frame) to receiving the frame. It includes the reference
  window's lookahead (frame i needs audio up to 40 i + 452.5 ms), which no
  implementation of these models can avoid.

`python -m benchmarks.stream_latency [--model demo] [--streams 1,4]`; writes
out/stream_latency.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.run import cpu_name
from lipsync.avatars.speech_signal import speech_like
from lipsync.core import lookahead
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc

CHUNK = 320  # 20 ms at 16 kHz
LOOKAHEAD_MS = max(lookahead.samples_needed(i) / 16 - 40 * i for i in range(100))


def run_stream(address: str, model: str, clip: np.ndarray, result: dict) -> None:
    """One realtime session: feed `clip` at real time, then 1 s of nothing, then close."""
    sent_at: dict[int, float] = {}  # chunk index -> send time
    outbox: queue.Queue = queue.Queue()

    def requests():
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id=model, realtime=True))
        while (item := outbox.get()) is not None:
            yield item

    frames: list[tuple[float, cpb.StreamFrame]] = []
    with grpc.insecure_channel(address) as channel:
        stream = cpb_grpc.CompositingServiceStub(channel).StreamComposite(requests())

        def read() -> None:
            for f in stream:
                frames.append((time.monotonic(), f))

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)  # let the session start idling
        t0 = time.monotonic()
        for k in range(0, len(clip), CHUNK):
            due = t0 + k / 16000
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            sent_at[k // CHUNK] = time.monotonic()
            outbox.put(cpb.StreamRequest(audio=clip[k : k + CHUNK].tobytes()))
        outbox.put(cpb.StreamRequest(end_of_audio=True))
        time.sleep(1.5)
        outbox.put(None)
        reader.join(30)
    speech = [(t, f) for t, f in frames if f.generated and f.clip == 0]
    lat = []
    for t, f in speech:
        chunk = min((f.clip_frame * 640) // CHUNK, max(sent_at))
        lat.append((t - sent_at[chunk]) * 1000)
    result.update(
        first_frame_ms=(speech[0][0] - sent_at[0]) * 1000 if speech else float("nan"),
        steady=lat[25:-12] if len(lat) > 40 else lat,  # skip the start and the flushed tail
        server_latency=[f.latency_ms for _, f in speech],
        frames=len(frames),
        speech_frames=len(speech),
        idle_frames=sum(1 for _, f in frames if not f.generated),
    )


def measure(address: str, model: str, n_streams: int, seconds: float) -> dict:
    results = [dict() for _ in range(n_streams)]
    threads = [
        threading.Thread(
            target=run_stream, args=(address, model, speech_like(seconds, seed=i), results[i])
        )
        for i in range(n_streams)
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    steady = np.concatenate([r["steady"] for r in results])

    def drift(lat: list[float]) -> float:
        """ms of latency gained per second of speech: ~0 when frames are made at 25 fps
        or faster, (25 / fps - 1) x 1000 when they are made at `fps` < 25."""
        return float(np.polyfit(np.arange(len(lat)) / 25.0, lat, 1)[0]) if len(lat) > 2 else 0.0

    return {
        "streams": n_streams,
        "first_frame_ms": float(np.median([r["first_frame_ms"] for r in results])),
        "steady_p50_ms": float(np.percentile(steady, 50)),
        "steady_p95_ms": float(np.percentile(steady, 95)),
        "server_p50_ms": float(
            np.percentile(np.concatenate([r["server_latency"] for r in results]), 50)
        ),
        "steady_drift_ms_per_s": float(np.median([drift(r["steady"]) for r in results])),
        "speech_frames": int(sum(r["speech_frames"] for r in results)),
        "idle_frames": int(sum(r["idle_frames"] for r in results)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.stream_latency", description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--seconds", type=float, default=8.0, help="speech per stream")
    ap.add_argument("--out", default="out/stream_latency.json")
    args = ap.parse_args(argv)
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    rows = []
    with ServiceProcesses(
        env=env, inference_port=free_port(), compositing_port=free_port(), quiet=True
    ) as services:
        measure(services.address, args.model, 1, 2.0)  # warm up
        for n in (int(s) for s in args.streams.split(",")):
            rows.append(measure(services.address, args.model, n, args.seconds))
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": "python -m benchmarks.stream_latency " + " ".join(argv or []),
        "model": args.model,
        "lookahead_ms": LOOKAHEAD_MS,
        "target_ms": LOOKAHEAD_MS + 150,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n== stream latency, {report['date']}, {report['machine']}, model {args.model} ==")
    print(
        f"algorithmic lookahead {LOOKAHEAD_MS:.1f} ms; target steady state <= "
        f"{report['target_ms']:.1f} ms for one stream\n"
    )
    print(
        "streams  first frame ms  steady p50 ms  steady p95 ms  drift ms/s  server p50 ms  "
        "speech/idle frames"
    )
    for r in rows:
        print(
            f"{r['streams']:>7} {r['first_frame_ms']:15.0f} {r['steady_p50_ms']:14.0f} "
            f"{r['steady_p95_ms']:14.0f} {r['steady_drift_ms_per_s']:11.1f} "
            f"{r['server_p50_ms']:14.0f}   {r['speech_frames']}/{r['idle_frames']}"
        )
    print("(drift: steady latency gained per second of speech; ~0 keeps up with 25 fps)")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
