"""Load shedding under overload (docs/RELIABILITY.md, issue 10 item 3).

Clients send InferBatchComposite requests of `--batch` frames in closed loops with a
client deadline (`--timeout`); a request refused with RESOURCE_EXHAUSTED waits the
`retry-after-ms` hint (at most the time left) and is counted as refused. Measured first
unloaded (one client), then with `--factor` x `--capacity` clients, with admission
control at `--capacity` requests in progress and with it off. Reported per phase: the
admitted requests' p50/p95 latency, goodput (frames of requests answered in time per
second), refused and timed-out counts.

`python -m benchmarks.overload [--tiny] [--seconds 20]`; writes out/overload.json.
Bounded: every phase runs `--seconds`; loopback only.
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
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc


def phase(address: str, model: str, clients: int, seconds: float, batch: int, timeout: float):
    audio = (speech_like(batch / 25 + 1.0, seed=3) * 32767).astype("<i2").tobytes()
    lat: list[float] = []
    counts = {"ok": 0, "refused": 0, "timeout": 0, "error": 0}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        with grpc.insecure_channel(address) as ch:
            stub = cpb_grpc.CompositingServiceStub(ch)
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    r = stub.InferBatchComposite(
                        cpb.CompositeBatchRequest(
                            model_id=model, raw_audio=audio, audio_encoding=1, batch_size=batch
                        ),
                        timeout=timeout,
                    )
                    kind = "ok" if r.success else "error"
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        kind = "refused"
                        hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms", "100")
                        time.sleep(min(int(hint), 1000) / 1000 * (0.5 + np.random.random()))
                    elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        kind = "timeout"
                    else:
                        kind = "error"
                with lock:
                    counts[kind] += 1
                    if kind == "ok":
                        lat.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    wall = time.monotonic() - t0
    a = np.array(lat) if lat else np.array([np.nan])
    return {
        "clients": clients,
        "p50_s": float(np.percentile(a, 50)),
        "p95_s": float(np.percentile(a, 95)),
        "goodput_fps": counts["ok"] * batch / wall,
        **counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tiny", action="store_true", help="small avatar, tiny test networks")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--capacity", type=int, default=2, help="requests in progress admitted")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=8.0)
    ap.add_argument("--out", default="out/overload.json")
    args = ap.parse_args()
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    if args.tiny:
        args.model = use_tiny_avatar(env, "overload_")
    results = {}
    for name, frames in (
        ("admission", args.capacity * args.batch),
        ("no_admission", 1_000_000),
    ):
        e = dict(env, LIPSYNC_COMPOSITING__ADMISSION__MAX_INFLIGHT_FRAMES=str(frames))
        with ServiceProcesses(
            env=e, inference_port=free_port(), compositing_port=free_port(), quiet=True
        ) as s:
            phase(s.address, args.model, 1, 3.0, args.batch, args.timeout)  # warm up
            if name == "admission":
                results["unloaded"] = phase(
                    s.address, args.model, 1, args.seconds, args.batch, args.timeout
                )
            results[name] = phase(
                s.address,
                args.model,
                args.factor * args.capacity,
                args.seconds,
                args.batch,
                args.timeout,
            )
        print(name, json.dumps(results[name]))
    results["config"] = vars(args)
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
