"""The inference service killed (SIGKILL) and restarted under traffic (docs/RELIABILITY.md,
issue 10 item 5).

Both services run as subprocesses (`lipsync.local.launch.ServiceProcesses`). A client sends
small InferBatchComposite requests back to back (deadline `--timeout`) while an offline
stream renders a clip; the inference service is killed, kept down `--down` seconds, and
started again. Reported: when the compositing service's readiness
(`compositing.CompositingService` health) went NOT_SERVING and SERVING again, how long
after the inference service answered its health check the first request succeeded again,
how many requests failed, and whether the stream delivered every frame.

`python -m benchmarks.faults [--tiny] [--down 3]`; writes out/faults.json. Bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.bench_avatar import use_tiny_avatar
from lipsync.avatars.speech_signal import speech_like
from lipsync.client import chunked, clip_requests
from lipsync.core.windows import frames_of_samples
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc


def status(stub, service: str) -> int:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5).status
    except grpc.RpcError:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tiny", action="store_true", help="small avatar, tiny test networks")
    ap.add_argument("--down", type=float, default=3.0, help="seconds the service stays down")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--clip", type=float, default=8.0, help="seconds of the stream's clip")
    ap.add_argument("--out", default="out/faults.json")
    args = ap.parse_args()
    env = dict(os.environ, LIPSYNC_LOG_LEVEL="WARNING")
    if args.tiny:
        args.model = use_tiny_avatar(env, "faults_")
    inf_port, comp_port = free_port(), free_port()
    services = ServiceProcesses(
        env=env, inference_port=inf_port, compositing_port=comp_port, quiet=True
    ).start()
    events: dict[str, float] = {}
    try:
        ch = grpc.insecure_channel(services.address)
        stub = cpb_grpc.CompositingServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        inf_health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"localhost:{inf_port}"))
        audio = speech_like(0.5, seed=2)
        stop = threading.Event()
        results: list[tuple[float, str]] = []

        def client() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = stub.InferBatchComposite(
                        cpb.CompositeBatchRequest(
                            model_id=args.model, raw_audio=audio.tobytes(), batch_size=2
                        ),
                        timeout=args.timeout,
                    )
                    kind = "ok" if r.success else "failed"
                except grpc.RpcError as exc:
                    kind = exc.code().name
                results.append((time.monotonic(), kind))
                if kind != "ok":
                    time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))

        clip = speech_like(args.clip, seed=5)
        frames: list[cpb.StreamFrame] = []

        def stream() -> None:
            def requests():
                start = cpb.StreamStart(model_id=args.model)
                return clip_requests(start, [chunked(clip, 1600)], pause_s=0.05)

            try:
                frames.extend(stub.StreamComposite(requests(), timeout=300))
            except grpc.RpcError as exc:
                events["stream_error"] = exc.code().value[0]

        def watch() -> None:
            last = None
            while not stop.is_set():
                s = status(health, "compositing.CompositingService")
                if s != last and "killed" in events:
                    if s == 2:
                        events.setdefault("not_ready", time.monotonic())
                    elif s == 1 and "not_ready" in events:
                        events.setdefault("ready_again", time.monotonic())
                last = s
                time.sleep(0.05)

        threads = [threading.Thread(target=f) for f in (client, stream, watch)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        inf = services.procs[0]
        events["killed"] = time.monotonic()
        inf.send_signal(signal.SIGKILL)
        inf.wait(10)
        time.sleep(args.down)
        events["restarted"] = time.monotonic()
        cmd = [sys.executable, "-m", "inference_service", "--port", str(inf_port)]
        services.procs[0] = subprocess.Popen(
            cmd, env=services.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while status(inf_health, "") != 1:
            time.sleep(0.02)
        events["inference_serving"] = time.monotonic()
        threads[1].join(300)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        back = events["inference_serving"]
        first_ok_after = next((t for t, k in results if k == "ok" and t > back), None)
        failed = [k for t, k in results if k != "ok"]
        t0 = events["killed"]
        out = {
            "down_s": args.down,
            "restart_to_serving_s": back - events["restarted"],
            "not_ready_after_kill_s": events.get("not_ready", np.nan) - t0,
            "ready_after_serving_s": events.get("ready_again", np.nan) - back,
            "first_ok_after_serving_s": (first_ok_after - back) if first_ok_after else None,
            "requests": len(results),
            "requests_failed": len(failed),
            "failed_codes": sorted(set(failed)),
            "stream_frames": len(frames),
            "stream_frames_expected": frames_of_samples(len(clip)),
            "stream_error": events.get("stream_error"),
        }
    finally:
        services.stop()
    print(json.dumps(out, indent=2))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
