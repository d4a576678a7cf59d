"""`make bench`: every stage's cost per frame, the UNet alone (the ceiling), the reference
script's one-frame-at-a-time loop, and end-to-end throughput through both services for
1, 2, 4 and 8 concurrent clients, all in one run on this machine. On the CPU also the
int8 UNet (`lipsync-avatar quantize`, inference.cpu_precision: int8): alone, and end to
end for 1 and 4 clients, beside float32.

Prints one table and writes the figures to out/bench.json. Compare ratios within a run:
the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort

from benchmarks import bench_avatar
from benchmarks import h264 as h264_bench
from benchmarks.transfer import bench_transfer
from compositing_service.compositor import paste_and_encode
from compositing_service.jpeg import JpegEncoder
from inference_service.sessions import SessionOptions, UNetBinding, create_session
from lipsync.avatars.quantize import INT8_UNET_FILE, RECORD_FILE, read_record
from lipsync.avatars.quantize.check import Int8RefusedError, file_sha256
from lipsync.avatars.speech_signal import speech_like
from lipsync.config import load_config
from lipsync.core import audio, mel, windows
from lipsync.core.visual import face_crop, inner, mouth_to_uint8, paste_back, visual_input
from lipsync.local.launch import ServiceProcesses
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc

OUT = Path("out")


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def default_unet_batches(gpu: bool) -> str:
    return "1,8,16,32,64" if gpu else "1,2,4,8,16"


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def cpu_int8_features() -> list[str]:
    """The CPU's int8 dot-product instructions (VNNI, AMX), from /proc/cpuinfo's flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def ensure_int8(folder: Path, samples: int) -> dict:
    """The bench avatar's int8 UNet (made by lipsync-avatar quantize's code if missing or
    stale); returns its calibration record's check."""
    try:
        record = read_record(folder / RECORD_FILE)
        if record.float_sha256 == file_sha256(folder / "unet.onnx") and (
            record.int8_sha256 == file_sha256(folder / INT8_UNET_FILE)
        ):
            return record.check
    except (Int8RefusedError, OSError):
        pass
    from lipsync.avatars.quantize.build import describe, quantize_avatar
    from lipsync.avatars.quantize.options import QuantizeOptions

    print("quantizing the bench avatar's UNet to int8 (lipsync-avatar quantize)...", flush=True)
    report = quantize_avatar(folder, QuantizeOptions(samples=samples))
    print(describe(report))
    if report.int8_path is None:
        raise RuntimeError(f"the bench avatar's int8 UNet failed its check: {report.check}")
    return report.record.check


def served_precision(address: str, model_id: str) -> tuple[str, str]:
    """The UNet precision the services serve `model_id` with, and its note (GetModelStats)."""
    with grpc.insecure_channel(address) as channel:
        stub = cpb_grpc.CompositingServiceStub(channel)
        (st,) = stub.GetModelStats(cpb.GetModelStatsRequest(model_id=model_id)).stats
    return st.unet_precision, st.precision_note


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- stages --------------------------------------------------------------------------------
def bench_stages(folder: Path, opts: SessionOptions, quality: int) -> dict[str, float]:
    """Milliseconds per video frame of each pipeline stage, on one core."""
    cv2.setNumThreads(1)  # per core, as the compositing service runs frames in parallel
    ms: dict[str, float] = {}
    clip = speech_like(10.0)
    n_frames = windows.clip_frame_count(1 + len(clip) // audio.HOP)
    ms["mel"] = median_time(lambda: mel.melspectrogram(clip), 5) * 1e3 / n_frames
    spec = mel.melspectrogram(clip)
    wins = windows.mel_windows(spec)
    enc = create_session(folder / "audio_encoder.onnx", opts)
    name = enc.get_inputs()[0].name
    ms["audio_encoder"] = median_time(lambda: enc.run(None, {name: wins}), 3) * 1e3 / len(wins)
    feats = enc.run(None, {name: wins})[0]
    ms["audio_blocks"] = (
        median_time(lambda: windows.feature_blocks(feats, np.arange(n_frames)), 5) * 1e3 / n_frames
    )

    frame720 = bench_avatar.make_frame(1280, 720, 0)
    rect720 = bench_avatar.face_rect(1280, 720, 0)
    frame1080 = bench_avatar.make_frame(1920, 1080, 0)
    rect1080 = bench_avatar.face_rect(1920, 1080, 0)
    ms["crop"] = median_time(lambda: inner(face_crop(frame720, rect720)).copy(), 20) * 1e3
    crops8 = np.stack([inner(face_crop(frame720, rect720))] * 8)
    ms["visual_input"] = median_time(lambda: visual_input(crops8), 10) * 1e3 / 8
    pred8 = np.random.default_rng(0).random((8, 3, 320, 320), dtype=np.float32)
    ms["mouth_to_uint8"] = median_time(lambda: mouth_to_uint8(pred8), 10) * 1e3 / 8
    mouth = mouth_to_uint8(pred8[:1])[0]
    crop720 = face_crop(frame720, rect720)
    crop1080 = face_crop(frame1080, rect1080)

    def paste(frame: np.ndarray, rect: list[int], crop: np.ndarray) -> np.ndarray:
        out = frame.copy()
        paste_back(out, rect, crop, mouth)
        return out

    ms["paste_720p"] = median_time(lambda: paste(frame720, rect720, crop720), 20) * 1e3
    ms["paste_1080p"] = median_time(lambda: paste(frame1080, rect1080, crop1080), 20) * 1e3
    enc = JpegEncoder(quality)
    ms["jpeg_720p"] = median_time(lambda: enc.encode(frame720), 20) * 1e3
    ms["jpeg_1080p"] = median_time(lambda: enc.encode(frame1080), 20) * 1e3

    for name, frame, rect, crop in (
        ("720p", frame720, rect720, crop720),
        ("1080p", frame1080, rect1080, crop1080),
    ):
        # what the compositor does per frame
        base = enc.encode_frame(frame)
        ms[f"paste_jpeg_region_{name}"] = (
            median_time(
                lambda f=frame, r=rect, c=crop, b=base: paste_and_encode(enc, f, r, c, mouth, b),
                20,
            )
            * 1e3
        )
    return ms


class UNetAlone:
    """The UNet alone in ONNX Runtime, fed random inputs of each batch size."""

    def __init__(
        self, folder: Path, opts: SessionOptions, batches: list[int], model: str = "unet.onnx"
    ):
        self.session = create_session(folder / model, opts, fp16_ok=model == "unet.onnx")
        b = UNetBinding.of(self.session)
        rng = np.random.default_rng(0)
        self.feeds = {
            batch: {
                b.visual: rng.random((batch, 6, 320, 320), dtype=np.float32),
                b.audio: rng.standard_normal((batch, 32, 16, 16)).astype(np.float32),
            }
            for batch in batches
        }

    def seconds_per_run(self, batch: int, frames: int, warmup: int = 0) -> float:
        """Median seconds of one run of `batch` frames, over runs totalling >= `frames`."""
        feeds = self.feeds[batch]
        return median_time(lambda: self.session.run(None, feeds), -(-frames // batch), warmup)

    def cpu_ms_per_frame(self, batch: int, frames: int) -> float:
        """CPU milliseconds (all the process's threads) per frame over runs of `batch`
        frames totalling >= `frames`: the work, whatever the neighbours take of the cores."""
        feeds = self.feeds[batch]
        runs = -(-frames // batch)
        t0 = time.process_time()
        for _ in range(runs):
            self.session.run(None, feeds)
        return (time.process_time() - t0) * 1e3 / (runs * batch)

    def table(self, min_frames: int, rounds: int = 3) -> dict[int, float]:
        """Frames per second at each batch size. The batch sizes take turns over `rounds`
        rounds, so a noisy minute on a shared machine falls on all of them alike; each
        batch size's figure is the median of its rounds."""
        times: dict[int, list[float]] = {batch: [] for batch in self.feeds}
        for r in range(rounds):
            for batch in self.feeds:
                frames = max(batch, min_frames // rounds)
                times[batch].append(self.seconds_per_run(batch, frames, warmup=int(r == 0)))
        return {batch: batch / statistics.median(t) for batch, t in times.items()}


def _torch_unet(gpu: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """The reference UNet in PyTorch eager (same random weights), if torch is installed;
    on the GPU when `gpu` and torch has CUDA, as the reference script runs it."""
    try:
        import torch

        from lipsync.avatars.nets import KIND_UNET, random_reference_state_dict
        from lipsync.avatars.nets.torch_nets import ReferenceUNet
    except ImportError:
        return None
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    net = ReferenceUNet().eval()
    sd = random_reference_state_dict(KIND_UNET, 0)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    net = net.to(device)
    torch.set_num_threads(os.cpu_count() or 1)

    def unet(vis: np.ndarray, blk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            v = torch.from_numpy(vis[None]).to(device)
            a = torch.from_numpy(blk[None]).to(device)
            return net(v, a).cpu().numpy()[0]

    return unet


def bench_reference_loops(
    folder: Path, sess: ort.InferenceSession, frames: int, quality: int, gpu: bool
) -> dict[str, float]:
    """The reference script's way: per frame crop -> tensor -> UNet (batch 1) -> paste -> JPEG,
    with the clip's audio features computed up front, as the reference does. Frames per
    second with the UNet in ONNX Runtime at batch 1, and in PyTorch eager when torch is
    installed (the `convert` extra). `sess`: the avatar's UNet in ONNX Runtime."""
    avatar_frames = [cv2.imread(str(folder / "frames" / f"{i}.jpg")) for i in range(frames)]
    rects = json.loads((folder / "crop_rects.json").read_text())
    blocks = np.random.default_rng(1).standard_normal((frames, 32, 16, 16)).astype(np.float32)
    params = [int(cv2.IMWRITE_JPEG_QUALITY), quality]
    b = UNetBinding.of(sess)

    def ort_unet(vis: np.ndarray, blk: np.ndarray) -> np.ndarray:
        return sess.run([b.output], {b.visual: vis[None], b.audio: blk[None]})[0][0]

    def loop(unet: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int) -> None:
        for i in range(n):
            img = avatar_frames[i].copy()
            crop = face_crop(img, rects[i])
            vis = visual_input(inner(crop))[0]
            pred = unet(vis, blocks[i])
            paste_back(img, rects[i], crop, mouth_to_uint8(pred))
            cv2.imencode(".jpg", img, params)

    out = {}
    for name, unet in (("onnxruntime", ort_unet), ("pytorch", _torch_unet(gpu))):
        if unet is None:
            continue
        loop(unet, 2)  # warm up
        t0 = time.perf_counter()
        loop(unet, frames)
        out[name] = frames / (time.perf_counter() - t0)
    return out


# -- end to end ----------------------------------------------------------------------------
def bench_e2e(
    address: str, clients: list[int], requests: int, batch: int, ceiling_now: Callable[[], float]
) -> dict:
    """Throughput and latency for each number of clients. `ceiling_now()` measures the UNet
    alone; it runs before each client count and after the last, so each end-to-end figure
    is compared with the ceiling measured around it (shared machines drift by the minute):
    the higher of the two, since a busy neighbour can only make a measurement slower."""
    clip = speech_like(4.0, seed=3)
    n_frames = windows.clip_frame_count(1 + len(clip) // audio.HOP)
    payload = clip.tobytes()
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 28)])
    stub = cpb_grpc.CompositingServiceStub(channel)

    def request(k: int) -> cpb.CompositeBatchResponse:
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id=bench_avatar.NAME,
                raw_audio=payload,
                batch_size=batch,
                start_frame_idx=k * batch,
                clip_frame_offset=(k * batch) % (n_frames - batch),
            )
        )
        if not resp.success:
            raise RuntimeError(resp.error)
        return resp

    t0 = time.perf_counter()
    request(0)  # the first request loads the model (lazily) and warms up
    first_ms = (time.perf_counter() - t0) * 1e3
    results: dict = {"first_request_ms": first_ms}
    before = ceiling_now()
    for c in clients:
        r = _run_clients(request, c, requests, batch)
        after = ceiling_now()
        r["ceiling_around_fps"] = [before, after]
        r["ratio_to_ceiling_around"] = r["fps"] / max(before, after)
        results[c] = r
        before = after
    channel.close()
    return results


def _run_clients(
    request: Callable[[int], cpb.CompositeBatchResponse], clients: int, requests: int, batch: int
) -> dict:
    """`clients` threads each sending `requests` requests back to back."""
    latencies: list[float] = []
    transfer: list[float] = []
    audio_ms: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(idx: int) -> None:
        barrier.wait()
        for r in range(requests):
            t0 = time.perf_counter()
            resp = request(idx * requests + r)
            dt_ms = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(dt_ms)
                st = resp.stage_times_ms
                transfer.append(st.get("transfer", 0.0))
                audio_ms.append(
                    sum(st.get(f"inference.{k}", 0.0) for k in ("mel", "audio_encoder"))
                )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    frames = clients * requests * batch
    return {
        "fps": frames / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "frames": frames,
        "transfer_ms_per_frame": float(np.sum(transfer)) / frames,
        "audio_ms_per_frame": float(np.sum(audio_ms)) / frames,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=6, help="requests per client")
    ap.add_argument("--batch-size", type=int, default=8, help="frames per request")
    ap.add_argument("--unet-batches", help="default: 1,2,4,8,16 on the CPU; 1,8,16,32,64 on a GPU")
    ap.add_argument("--reference-frames", type=int, default=16)
    ap.add_argument(
        "--int8-samples", type=int, default=32, help="calibration frames of the int8 UNet"
    )
    ap.add_argument(
        "--int8-clients", default="1,4", help="end-to-end client counts for int8 ('': no int8)"
    )
    ap.add_argument("--out", default=str(OUT / "bench.json"))
    args = ap.parse_args(argv)
    cfg = load_config()
    icfg = cfg.inference
    opts = SessionOptions.from_config(icfg)
    root = OUT / "bench" / "avatars"
    print("building the bench avatar (reference-size networks, random weights, 1280x720)...")
    folder = bench_avatar.build(root)

    provider = create_session(folder / "audio_encoder.onnx", opts).get_providers()[0]
    gpu = provider != "CPUExecutionProvider"
    print(f"networks run on {provider}")

    print("measuring stages...")
    stages = bench_stages(folder, opts, cfg.compositing.jpeg_quality)
    for name, ms in bench_transfer(args.batch_size).items():
        stages[f"transfer_{name}"] = ms
    print("measuring H.264 beside JPEG (benchmarks/h264.py)...")
    h264 = cfg.compositing.stream.h264
    h264_cost = {
        name: by_preset[h264.preset]
        for name, by_preset in h264_bench.bench_cost(
            100, [h264.preset], h264, cfg.compositing.jpeg_quality
        ).items()
    }
    print("measuring the UNet alone...")
    batches = [int(b) for b in (args.unet_batches or default_unet_batches(gpu)).split(",")]
    min_frames = 320 if gpu else 24
    unet = UNetAlone(folder, opts, batches)
    unet_fps = unet.table(min_frames)
    # On a GPU, the same batches in float32 beside the float16 the service runs by default.
    unet_fps_fp32 = (
        UNetAlone(folder, dataclasses.replace(opts, cuda_fp16=False), batches).table(min_frames)
        if gpu and opts.cuda_fp16
        else None
    )
    best_batch = max(unet_fps, key=unet_fps.get)

    def ceiling_now() -> float:
        return best_batch / unet.seconds_per_run(best_batch, min_frames)

    int8_clients = [int(c) for c in args.int8_clients.split(",") if c] if not gpu else []
    int8: dict = {}
    if int8_clients:
        int8["quantize_check"] = ensure_int8(folder, args.int8_samples)
        print("measuring the int8 UNet alone...")
        unet8 = UNetAlone(
            folder, dataclasses.replace(opts, providers=("cpu",)), batches, INT8_UNET_FILE
        )
        # float32 and int8 take turns, so both see the same minutes of a shared machine
        fps8 = unet8.table(min_frames)
        fps32 = unet.table(min_frames)
        best8 = max(fps8, key=fps8.get)
        # CPU time per frame, float32 and int8 taking turns: the work each does, which a
        # shared machine's neighbours do not change the way they change wall time
        cpu_ms: dict[str, list[float]] = {"float32": [], "int8": []}
        for _ in range(3):
            cpu_ms["float32"].append(unet.cpu_ms_per_frame(1, min_frames))
            cpu_ms["int8"].append(unet8.cpu_ms_per_frame(1, min_frames))
        cpu32, cpu8 = (statistics.median(v) for v in cpu_ms.values())
        int8.update(
            unet_fps_by_batch={str(k): v for k, v in fps8.items()},
            unet_fps_by_batch_fp32_same_time={str(k): v for k, v in fps32.items()},
            unet_best_batch=best8,
            unet_speedup_best=fps8[best8] / max(fps32.values()),
            unet_speedup_median_of_batches=statistics.median(fps8[b] / fps32[b] for b in fps8),
            unet_cpu_ms_per_frame_batch1={"float32": cpu32, "int8": cpu8},
            unet_speedup_cpu_time=cpu32 / cpu8,
        )

        def ceiling_now_int8() -> float:
            return best8 / unet8.seconds_per_run(best8, min_frames)

    print("measuring the reference loop...")
    ref_loops = bench_reference_loops(
        folder, unet.session, args.reference_frames, cfg.compositing.jpeg_quality, gpu
    )
    ref_kind = "pytorch" if "pytorch" in ref_loops else "onnxruntime"
    ref_fps = ref_loops[ref_kind]
    print("measuring end to end through both services...")
    env = dict(os.environ, AVATARS_DIR=str(root), LIPSYNC_LOG_LEVEL="WARNING")
    clients = [int(c) for c in args.clients.split(",")]
    services = ServiceProcesses(
        env=env, inference_port=free_port(), compositing_port=free_port(), quiet=True
    )
    t0 = time.perf_counter()
    with services.start():
        start_s = time.perf_counter() - t0
        e2e = bench_e2e(services.address, clients, args.requests, args.batch_size, ceiling_now)
    first_request_ms = e2e.pop("first_request_ms")
    if int8_clients:
        print("measuring end to end with the int8 UNet (inference.cpu_precision: int8)...")
        env8 = dict(env, LIPSYNC_INFERENCE__CPU_PRECISION="int8")
        services8 = ServiceProcesses(
            env=env8, inference_port=free_port(), compositing_port=free_port(), quiet=True
        )
        with services8.start():
            e2e8 = bench_e2e(
                services8.address, int8_clients, args.requests, args.batch_size, ceiling_now_int8
            )
            int8["served"], int8["served_note"] = served_precision(
                services8.address, bench_avatar.NAME
            )
        e2e8.pop("first_request_ms")
        probes8 = [e2e8[int8_clients[0]]["ceiling_around_fps"][0]]
        probes8 += [e2e8[c]["ceiling_around_fps"][1] for c in int8_clients]
        int8["unet_ceiling_fps"] = statistics.median([fps8[best8], *probes8])
        int8["e2e"] = {str(c): r for c, r in e2e8.items()}
        int8["e2e_fps"] = {str(c): r["fps"] for c, r in e2e8.items()}
        int8["ratio_e2e_int8_to_float32"] = {
            str(c): e2e8[c]["fps"] / e2e[c]["fps"] for c in int8_clients if c in e2e
        }
    # The ceiling: the UNet alone at its best batch, the median of every time it was
    # measured in this run (the batch table and the runs around each end-to-end figure).
    probes = [e2e[clients[0]]["ceiling_around_fps"][0]]
    probes += [e2e[c]["ceiling_around_fps"][1] for c in clients]
    ceiling = statistics.median([unet_fps[best_batch], *probes])
    stages["unet"] = 1e3 / ceiling
    # between the services inside the end-to-end runs (queueing included), default wire type
    stages["transfer_e2e"] = statistics.median(r["transfer_ms_per_frame"] for r in e2e.values())

    machine = f"{cpu_name()}, {os.cpu_count()} cores; onnxruntime {ort.__version__} ({provider})"
    if gpu:
        machine += f"; GPU: {gpu_name()}"
    ref_clients = 4 if 4 in e2e else clients[-1]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "command": "make bench",
        "jpeg_quality": cfg.compositing.jpeg_quality,
        "stages_ms_per_frame": stages,
        "unet_fps_by_batch": {str(k): v for k, v in unet_fps.items()},
        "unet_precision": "float16" if gpu and opts.cuda_fp16 else "float32",
        "unet_fps_by_batch_fp32": (
            {str(k): v for k, v in unet_fps_fp32.items()} if unet_fps_fp32 else None
        ),
        "unet_best_batch": best_batch,
        "unet_ceiling_fps": ceiling,
        "unet_ceiling_measurements_fps": [unet_fps[best_batch], *probes],
        "reference_loop_fps": ref_fps,
        "reference_loop_kind": ref_kind,
        "reference_loops_fps": ref_loops,
        "ratio_e2e_to_reference_loops": {
            k: e2e[ref_clients]["fps"] / v for k, v in ref_loops.items()
        },
        "e2e_fps": {str(c): r["fps"] for c, r in e2e.items()},
        "e2e": {str(c): r for c, r in e2e.items()},
        "e2e_batch_size": args.batch_size,
        "cold_start_s": start_s,
        "first_request_ms": first_request_ms,
        # against the ceiling measured just before and after that end-to-end run
        "ratio_e2e_to_ceiling": e2e[ref_clients]["ratio_to_ceiling_around"],
        "ratio_e2e_to_median_ceiling": e2e[ref_clients]["fps"] / ceiling,
        "ratio_e2e_to_reference_loop": e2e[ref_clients]["fps"] / ref_fps,
        "ratio_clients": ref_clients,
        "h264": dataclasses.asdict(h264),
        # per 720p frame, CPU time on one thread: paste + H.264 vs paste + region JPEG
        "h264_720p": h264_cost,
        "compositing_720p_ms_per_frame": stages["crop"] + stages["paste_jpeg_region_720p"],
        "compositing_720p_float32_ms_per_frame": stages["crop"]
        + stages["mouth_to_uint8"]
        + stages["paste_jpeg_region_720p"],
        "audio_share_of_frame_time": (
            stages["mel"] + stages["audio_encoder"] + stages["audio_blocks"]
        )
        / (1e3 / e2e[ref_clients]["fps"]),
        # measured inside the end-to-end run, where each request also encodes the
        # context windows around its frames
        "audio_share_e2e": e2e[ref_clients]["audio_ms_per_frame"] / (1e3 / e2e[ref_clients]["fps"]),
        "cpu_int8_features": cpu_int8_features(),
        "int8": int8 or None,
    }
    if int8:
        int8["ratio_ceiling_int8_to_float32"] = int8["unet_ceiling_fps"] / ceiling
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwritten to {args.out}")
    return 0


def print_report(r: dict) -> None:
    print(f"\n== make bench, {r['date']} ==\n{r['machine']}\n")
    print("stage                      ms/frame")
    for k, v in r["stages_ms_per_frame"].items():
        label = f"unet (batch {r['unet_best_batch']})" if k == "unet" else k
        print(f"  {label:<24} {v:8.3f}")
    fp32 = r.get("unet_fps_by_batch_fp32")
    print(f"\nUNet alone (ONNX Runtime, {r['unet_precision']})  frames/s")
    for b, v in r["unet_fps_by_batch"].items():
        also = f"   (float32: {fp32[b]:.2f})" if fp32 else ""
        print(f"  batch {b:<18} {v:8.2f}{also}")
    best = r["unet_best_batch"]
    runs = ", ".join(f"{v:.2f}" for v in r["unet_ceiling_measurements_fps"])
    print(
        f"\nceiling (UNet alone, best batch {best}): {r['unet_ceiling_fps']:.2f} frames/s "
        f"(median of {runs}: the table, then before the first and after each client count)"
    )
    for kind, fps in r["reference_loops_fps"].items():
        mark = " <- the reference's way" if kind == r["reference_loop_kind"] else ""
        print(f"reference loop, one frame at a time, UNet in {kind}: {fps:.2f} frames/s{mark}")
    print(f"\nend to end, {r['e2e_batch_size']} frames per request, raw audio in, JPEG out:")
    print("  clients   frames/s   p50 ms   p95 ms   UNet alone before/after   ratio to the higher")
    for c, e in r["e2e"].items():
        before, after = e["ceiling_around_fps"]
        print(
            f"  {c:>7} {e['fps']:10.2f} {e['p50_ms']:8.0f} {e['p95_ms']:8.0f}"
            f"   {before:10.2f} / {after:<10.2f}  {e['ratio_to_ceiling_around']:6.2f}"
        )
    print(
        f"\ncold start: both services healthy {r['cold_start_s']:.1f} s after launch; "
        f"first request (loads the model) {r['first_request_ms']:.0f} ms"
    )
    c = r["ratio_clients"]
    print(
        f"\nratio e2e ({c} clients) / ceiling measured around it (the higher): "
        f"{r['ratio_e2e_to_ceiling']:.2f} (to the run's median ceiling: "
        f"{r['ratio_e2e_to_median_ceiling']:.2f})"
    )
    for kind, ratio in r["ratio_e2e_to_reference_loops"].items():
        print(f"ratio e2e ({c} clients) / reference loop ({kind}): {ratio:.2f}")
    print(
        f"mel + audio encoder share of frame time: {100 * r['audio_share_of_frame_time']:.2f} % "
        f"(stages), {100 * r['audio_share_e2e']:.2f} % (measured end to end)"
    )
    print(
        f"compositing + JPEG at 720p, one core: {r['compositing_720p_ms_per_frame']:.2f} ms/frame "
        f"({r['compositing_720p_float32_ms_per_frame']:.2f} with float32 mouths to convert)"
    )
    h = r["h264"]
    print(
        f"\nH.264 streams ({h['encoder'][0]} {h['preset']}, {h['bitrate_kbps']} kbit/s, one "
        "thread) beside JPEG at 720p, paste + encode, CPU ms per frame on one core:"
    )
    for name, c in r["h264_720p"].items():
        print(
            f"  {name:<15} H.264 {c['h264_ms_per_frame']:6.2f} ms "
            f"({c['h264_streams_per_core']:5.1f} streams/core at 25 fps, "
            f"{c['h264_bytes_per_frame']:7.0f} B/frame, {c['h264_psnr_db']:5.2f} dB)   "
            f"JPEG {c['jpeg_region_ms_per_frame']:5.2f} ms "
            f"({c['jpeg_region_streams_per_core']:5.1f} streams/core, "
            f"{c['jpeg_bytes_per_frame']:7.0f} B/frame, {c['jpeg_psnr_db']:5.2f} dB)"
        )
    if r.get("int8"):
        print_int8(r)


def print_int8(r: dict) -> None:
    q = r["int8"]
    feats = ", ".join(r["cpu_int8_features"]) or "none"
    chk = q["quantize_check"]
    print(
        f"\nint8 UNet (QDQ, lipsync-avatar quantize; CPU int8 instructions: {feats}); its "
        f"check: mouth-region PSNR mean {chk['mean_psnr_db']:.2f} dB, worst "
        f"{chk['worst_psnr_db']:.2f} dB; served as: {q['served']}; {q['served_note']}"
    )
    print("UNet alone, float32 and int8 taking turns   float32 f/s   int8 f/s   int8/float32")
    for b, v8 in q["unet_fps_by_batch"].items():
        v32 = q["unet_fps_by_batch_fp32_same_time"][b]
        print(f"  batch {b:<36} {v32:11.2f} {v8:10.2f} {v8 / v32:10.2f}")
    print(
        f"int8 / float32, UNet alone, taking turns: {q['unet_speedup_best']:.2f}x (each at "
        f"its best batch), {q['unet_speedup_median_of_batches']:.2f}x (median over batches)"
    )
    c = q["unet_cpu_ms_per_frame_batch1"]
    print(
        f"CPU time per frame at batch 1 (the work, whatever the neighbours take): float32 "
        f"{c['float32']:.1f} ms, int8 {c['int8']:.1f} ms: {q['unet_speedup_cpu_time']:.2f}x"
    )
    print(
        f"ceiling: int8 {q['unet_ceiling_fps']:.2f} frames/s (best batch {q['unet_best_batch']}; "
        f"the median around its end-to-end runs) = {q['ratio_ceiling_int8_to_float32']:.2f} x "
        f"the float32 ceiling {r['unet_ceiling_fps']:.2f} (measured at other minutes)"
    )
    print("end to end    clients   float32 f/s   int8 f/s   int8/float32   int8 / its ceiling")
    for c, e in q["e2e"].items():
        f32 = r["e2e"][c]["fps"] if c in r["e2e"] else float("nan")
        print(
            f"  {'':<10} {c:>7} {f32:13.2f} {e['fps']:10.2f} "
            f"{q['ratio_e2e_int8_to_float32'].get(c, float('nan')):14.2f} "
            f"{e['ratio_to_ceiling_around']:18.2f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
