"""The transfer between the services alone: the compositing service's real inference
client calling a stand-in inference service (a separate process) that answers at once
with ready-made mouths. What is timed is the inference call as the compositing service
makes it (uint8 face crops out, mouths back, turned into paste pixels), so gRPC, protobuf
and the conversion, without any network run: milliseconds per frame for each wire type.

`python -m benchmarks.transfer` prints the figures; `make bench` includes them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from compositing_service.inference_client import TRANSFER_TYPES, InferenceClient
from inference_service.servicer import encode_mouths
from lipsync.core.tensors import FACE_CROP_BYTES
from lipsync.local.ports import free_port
from lipsync.proto import inference_pb2 as ipb
from lipsync.proto import inference_pb2_grpc as ipb_grpc
from lipsync.rpc.channel import wait_healthy
from lipsync.rpc.infer_wire import InferReply, add_inference_servicer
from lipsync.serving.grpc_server import add_health, bind, create_server

MAX_BYTES = 1 << 28


class _StandIn(ipb_grpc.InferenceServiceServicer):
    """Answers Infer with mouths encoded in advance, sent as the inference service sends
    them (the wire format only)."""

    def __init__(self, batch: int):
        mouths = np.random.default_rng(0).random((batch, 3, 320, 320), dtype=np.float32)
        self.payloads = {t: encode_mouths(mouths, t) for t in TRANSFER_TYPES.values()}
        self.batch = batch

    def Infer(self, request, context):
        crops = request.face_crops  # read, as the real service does
        if len(crops) != self.batch * FACE_CROP_BYTES:
            raise ValueError("unexpected batch")
        fields = ipb.InferResponse(output_type=request.output_type, batch_size=self.batch)
        return InferReply(fields, self.payloads[request.output_type])


def serve(port: int, batch: int) -> None:
    server = create_server(4, MAX_BYTES)
    add_inference_servicer(_StandIn(batch), server)
    add_health(server, ["lipsync.inference.InferenceService"])
    bind(server, "localhost", port)
    server.start()
    server.wait_for_termination()


def bench_transfer(batch: int = 8, calls: int = 20) -> dict[str, float]:
    """Milliseconds per frame of one inference call of `batch` frames, per wire type."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.transfer", "--serve", str(port)]
    root = Path(__file__).resolve().parent.parent  # where `benchmarks` imports from
    proc = subprocess.Popen([*cmd, "--batch", str(batch)], cwd=root, env=dict(os.environ))
    try:
        wait_healthy(f"localhost:{port}", 60, proc)
        crops = np.zeros((batch, 320, 320, 3), np.uint8).tobytes()
        out = {}
        for name in TRANSFER_TYPES:
            client = InferenceClient(f"localhost:{port}", MAX_BYTES, 60, name)
            try:
                times = []
                for _ in range(calls + 2):
                    t0 = time.perf_counter()
                    client.call(ipb.InferRequest(face_crops=crops, batch_size=batch))
                    times.append(time.perf_counter() - t0)
            finally:
                client.close()
            out[name] = float(np.median(times[2:])) * 1e3 / batch
        return out
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.transfer", description=__doc__)
    ap.add_argument("--serve", type=int, metavar="PORT", help="run the stand-in service")
    ap.add_argument("--batch", type=int, default=8, help="frames per call")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.batch)
        return 0
    for name, ms in bench_transfer(args.batch).items():
        print(f"transfer_{name:<8} {ms:8.3f} ms/frame ({args.batch} frames per call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
