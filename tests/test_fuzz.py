"""Hostile input (issue 10, item 7): seeded random mutations of valid messages to both
ports, unary and streaming. Neither service exits, memory stays bounded, and bad
requests do not flood the log with tracebacks. Bounded: a fixed number of messages,
each call with a short deadline, loopback only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from lipsync.local.ports import free_port
from lipsync.proto import common_pb2 as common
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import inference_pb2 as ipb
from tests.avatar_factory import speech_like
from tests.test_hardening import REPO, rss_mib, stop, write_config

SEED = 1234
UNARY_MESSAGES = int(os.environ.get("LIPSYNC_FUZZ_MESSAGES", "4000"))
STREAMS = 60


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation: flip bytes, truncate, insert or splice random bytes."""
    b = bytearray(data)
    kind = int(rng.integers(0, 5))
    if kind == 0 and b:  # flip a few bytes
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    elif kind == 1 and b:  # truncate
        del b[int(rng.integers(0, len(b))) :]
    elif kind == 2:  # insert random bytes
        at = int(rng.integers(0, len(b) + 1))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 3 and len(b) > 2:  # a huge varint length / field number in the header
        b[0:2] = (
            bytes([int(rng.integers(0, 256)), 0xFF])
            + b"\xff\xff\xff\x7f"[: int(rng.integers(0, 4))]
        )
    else:  # pure noise
        b = bytearray(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())
    return bytes(b)


def valid_messages() -> dict[str, list[bytes]]:
    audio = speech_like(0.3, seed=1)
    pcm16 = (audio * 32767).astype("<i2").tobytes()
    crops = np.zeros((1, 320, 320, 3), np.uint8).tobytes()
    comp = "/compositing.CompositingService/"
    inf = "/lipsync.inference.InferenceService/"
    return {
        comp + "InferBatchComposite": [
            cpb.CompositeBatchRequest(
                model_id="alice", raw_audio=audio.tobytes(), batch_size=1
            ).SerializeToString(),
            cpb.CompositeBatchRequest(
                model_id="alice",
                raw_audio=pcm16,
                audio_encoding=1,
                sample_rate=22050,
                batch_size=2,
                clip_frame_offset=3,
            ).SerializeToString(),
            cpb.CompositeBatchRequest(
                model_id="alice",
                audio_features=np.zeros((32, 16, 16), np.float32).tobytes(),
                batch_size=1,
            ).SerializeToString(),
        ],
        comp + "ListModels": [cpb.ListModelsRequest().SerializeToString()],
        comp + "LoadModel": [common.LoadModelRequest(model_id="alice").SerializeToString()],
        comp + "GetModelStats": [common.GetModelStatsRequest(model_id="bob").SerializeToString()],
        comp + "Health": [cpb.HealthRequest().SerializeToString()],
        inf + "Infer": [
            ipb.InferRequest(
                model_id="alice",
                batch_size=1,
                face_crops=crops,
                clip=ipb.AudioClip(pcm=audio.tobytes()),
            ).SerializeToString(),
        ],
        inf + "ListModels": [common.ListModelsRequest().SerializeToString()],
        inf + "UnloadModel": [common.UnloadModelRequest(model_id="bob").SerializeToString()],
    }


def stream_messages() -> list[bytes]:
    audio = speech_like(0.4, seed=2)
    return [
        cpb.StreamRequest(start=cpb.StreamStart(model_id="alice")).SerializeToString(),
        cpb.StreamRequest(audio=audio[:3200].tobytes()).SerializeToString(),
        cpb.StreamRequest(audio=audio[3200:].tobytes()).SerializeToString(),
        cpb.StreamRequest(interrupt=True).SerializeToString(),
        cpb.StreamRequest(end_of_audio=True).SerializeToString(),
    ]


def test_fuzz_both_ports(tmp_path, avatars_root, shared_encoder):
    config = write_config(tmp_path, avatars_root, shared_encoder)
    config.write_text(config.read_text().replace("log_level: WARNING", "log_level: INFO"))
    inf_port, comp_port = free_port(), free_port()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("inf", "comp")}  # noqa: SIM115
    env = {**os.environ, "LIPSYNC_CONFIG": str(config)}

    def spawn(module, port, log, **extra):
        return subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port)],
            env={**env, **extra},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    inf = spawn("inference_service", inf_port, logs["inf"])
    comp = spawn(
        "compositing_service",
        comp_port,
        logs["comp"],
        INFERENCE_ADDRESS=f"127.0.0.1:{inf_port}",
    )
    try:
        from lipsync.rpc.channel import wait_healthy

        wait_healthy(f"127.0.0.1:{inf_port}", 120, inf)
        wait_healthy(f"127.0.0.1:{comp_port}", 120, comp)
        rng = np.random.default_rng(SEED)
        channels = {
            "/compositing.": grpc.insecure_channel(f"127.0.0.1:{comp_port}"),
            "/lipsync.": grpc.insecure_channel(f"127.0.0.1:{inf_port}"),
        }

        def channel_of(method: str) -> grpc.Channel:
            return next(ch for prefix, ch in channels.items() if method.startswith(prefix))

        # warm up (models loaded, caches filled), then the baseline memory
        for method, msgs in valid_messages().items():
            call = channel_of(method).unary_unary(method)
            for m in msgs:
                with contextlib.suppress(grpc.RpcError):
                    call(m, timeout=30)
        base = {"inf": rss_mib(inf.pid), "comp": rss_mib(comp.pid)}

        plan = []
        items = list(valid_messages().items())
        for _ in range(UNARY_MESSAGES):
            method, msgs = items[int(rng.integers(0, len(items)))]
            msg = msgs[int(rng.integers(0, len(msgs)))]
            if rng.random() < 0.9:
                msg = mutate(msg, rng)
            plan.append((method, msg))
        codes: dict[str, int] = {}
        lock = threading.Lock()

        def send(item):
            method, msg = item
            try:
                channel_of(method).unary_unary(method)(msg, timeout=5)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] = codes.get(code, 0) + 1

        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, plan))
        unary_s = time.monotonic() - t0

        # streams: valid sequences with mutated messages in them
        stream_call = channels["/compositing."].stream_stream(
            "/compositing.CompositingService/StreamComposite"
        )
        good = stream_messages()
        stream_codes: dict[str, int] = {}
        for _ in range(STREAMS):
            seq = [
                mutate(m, rng) if rng.random() < 0.3 else m
                for m in good[: int(rng.integers(1, len(good) + 1))]
            ]
            try:
                for _ in stream_call(iter(seq), timeout=5):
                    pass
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            stream_codes[code] = stream_codes.get(code, 0) + 1

        assert inf.poll() is None and comp.poll() is None, "a service exited"
        for name, proc in (("inf", inf), ("comp", comp)):
            grown = rss_mib(proc.pid) - base[name]
            assert grown < 300, f"{name} grew {grown:.0f} MiB"
        # both still serve a valid request
        ok = channels["/compositing."].unary_unary("/compositing.CompositingService/Health")(
            cpb.HealthRequest().SerializeToString(), timeout=5
        )
        assert cpb.HealthResponse.FromString(ok).healthy
        print(
            f"fuzz: {UNARY_MESSAGES} unary in {unary_s:.1f} s {codes}; "
            f"{STREAMS} streams {stream_codes}"
        )
        for ch in channels.values():
            ch.close()
    finally:
        stop(comp)
        stop(inf)
        for f in logs.values():
            f.close()
    for name in ("inf", "comp"):
        text = Path(tmp_path / f"{name}.log").read_text(errors="replace")
        tracebacks = text.count("Traceback")
        assert tracebacks <= 12, f"{name}: {tracebacks} tracebacks in the log"
        assert len(text) < 4_000_000, f"{name}: {len(text)} bytes of log"
