"""A long offline stream costs the same per frame at its end as at its start
(docs/RELIABILITY.md, issue 10 item 2).

The client sends the whole clip as fast as gRPC flow control lets it (the stream stops
reading past `stream.max_buffered_audio_s`), and reads frames as they come. Reported:
frames/s over the first and the last `--window` frames and their ratio, the compositing
service's peak RSS, and whether every frame arrived.

`python -m benchmarks.long_stream [--seconds 660] [--model demo]`; writes
out/long_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench_avatar import use_tiny_avatar
from lipsync.avatars.speech_signal import speech_like
from lipsync.client import chunked, clip_requests
from lipsync.core.windows import frames_of_samples
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--seconds", type=float, default=660.0)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--out", default="out/long_stream.json")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="a small avatar with tiny test networks (tests/avatar_factory.py): the per-frame "
        "cost is then mostly what could grow with the clip (audio tails, buffers)",
    )
    args = ap.parse_args()
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    if args.tiny:
        args.model = use_tiny_avatar(env, "long_stream_")
    piece = speech_like(10.0, seed=1)
    clip = np.tile(piece, int(np.ceil(args.seconds / 10.0)))[: int(args.seconds * 16000)]
    clip = (clip * 32767).astype("<i2")
    total = frames_of_samples(len(clip))
    with ServiceProcesses(
        env=env, inference_port=free_port(), compositing_port=free_port(), quiet=True
    ) as services:
        comp_pid = services.procs[-1].pid
        peak = [0.0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(comp_pid))
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()

        def requests():  # 1 s a message
            start = cpb.StreamStart(model_id=args.model, audio_encoding=cpb.PCM_S16LE)
            return clip_requests(start, [chunked(clip, 16000)])

        times: list[float] = []
        t0 = time.monotonic()
        with grpc.insecure_channel(services.address) as ch:
            for _ in cpb_grpc.CompositingServiceStub(ch).StreamComposite(requests()):
                times.append(time.monotonic())
        done.set()
    w = min(args.window, len(times) // 3)
    first = (w - 1) / (times[w - 1] - times[0])
    last = (w - 1) / (times[-1] - times[-w])
    result = {
        "clip_seconds": args.seconds,
        "frames_expected": total,
        "frames_received": len(times),
        "wall_s": times[-1] - t0,
        "fps_first_window": first,
        "fps_last_window": last,
        "last_over_first": last / first,
        "compositing_peak_rss_mib": peak[0],
        "window": w,
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
