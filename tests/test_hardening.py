"""Issue 10: the services keep serving under overload, faults, long streams and hostile
input (docs/RELIABILITY.md). Every test is bounded in count and time; traffic only to
loopback; real servers in-process or as subprocesses."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compositing_service.inference_client import InferenceClient
from lipsync.avatars.package import (
    AvatarCatalog,
    AvatarError,
    UnknownModelError,
    check_frame_header,
    check_model_id,
    load_manifest,
)
from lipsync.client import chunked, clip_requests
from lipsync.core import lookahead, windows
from lipsync.local.ports import free_port
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.serving.admission import Admission, Overloaded
from tests.avatar_factory import make_avatar, speech_like
from tests.oracle import Oracle, decode_jpeg, jpeg_roundtrip, psnr

REPO = Path(__file__).resolve().parents[1]
SERVICE_NAME = "compositing.CompositingService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- helpers -----------------------------------------------------------------------------
def health_status(address: str, service: str = "", timeout: float = 1.0) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            .status
        )


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write_config(tmp: Path, avatars_root: Path, shared_encoder: Path, **extra) -> Path:
    cfg = {
        "avatars_dir": str(avatars_root),
        "log_level": "WARNING",
        "access_log": "off",
        "shutdown_grace_s": extra.pop("grace", 3.0),
        "limits": {"max_batch_size": 32, "max_audio_seconds": 30.0},
        "inference": {
            "host": "127.0.0.1",
            "execution_providers": ["cpu"],
            "intra_op_threads": 1,
            "shared_audio_encoder": str(shared_encoder),
            "metrics_port": 0,
        },
        "compositing": {
            "host": "127.0.0.1",
            "workers": 1,
            "jpeg_quality": 95,
            "metrics_port": 0,
            **extra,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(module: str, port: int, config: Path, **env) -> subprocess.Popen:
    e = {**os.environ, "LIPSYNC_CONFIG": str(config), **env}
    return subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port)],
        env=e,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def offline_frames(stub, clip: np.ndarray, start: int = 0) -> list[bytes]:
    n = windows.clip_frame_count(1 + len(clip) // 200)
    out: list[bytes] = []
    for k in range(0, n, 32):
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice",
                raw_audio=clip.tobytes(),
                batch_size=min(32, n - k),
                start_frame_idx=start + k,
                clip_frame_offset=k,
            ),
            timeout=60,
        )
        assert resp.success, resp.error
        out.extend(resp.composited_frames)
    return out


def start_compositing(cfg, inference_address: str):
    from compositing_service.server import start

    cfg.compositing.inference_address = inference_address
    return start(cfg, port=0, preload=False)


# -- 1. streams never starve unary calls or health -----------------------------------------
def test_idle_streams_do_not_starve_health_or_unary_calls(services, avatars_root, shared_encoder):
    from tests.conftest import service_config

    cfg = service_config(avatars_root, shared_encoder)
    cfg.compositing.max_workers = 4
    cfg.compositing.stream.max_sessions = 24
    comp = start_compositing(cfg, services.inference_address)
    address = f"127.0.0.1:{comp.port}"
    release = threading.Event()
    accepted = threading.Semaphore(0)

    def idle_requests():
        yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice"))
        release.wait(30)  # an idle stream: no audio, never closes its side

    channel = grpc.insecure_channel(address)
    stub = cpb_grpc.CompositingServiceStub(channel)
    calls = []
    try:
        for _ in range(24):
            call = stub.StreamComposite(idle_requests())
            calls.append(call)
            threading.Thread(
                target=lambda c=call: (c.initial_metadata(), accepted.release()), daemon=True
            ).start()
        for _ in range(24):
            assert accepted.acquire(timeout=20), "a stream was not accepted"
        # with max_sessions streams open: health, unary calls answer promptly ...
        t0 = time.monotonic()
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        stub.Health(cpb.HealthRequest(), timeout=1.0)
        stub.ListModels(cpb.ListModelsRequest(), timeout=1.0)
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice", raw_audio=speech_like(0.5).tobytes(), batch_size=1
            ),
            timeout=5.0,
        )
        assert resp.success, resp.error
        assert time.monotonic() - t0 < 5.0
        # ... and the next stream is refused at once
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamComposite(idle_requests(), timeout=5.0))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        for c in calls:
            c.cancel()
        channel.close()
        comp.stop(0)


# -- 2. cost in proportion to the work -----------------------------------------------------
def test_huge_clip_frame_offset_is_cheap_and_frames_past_the_end_are_defined(
    services, avatars_root
):
    client = InferenceClient(services.inference_address, 1 << 26, 30, "uint8")
    crops = np.zeros((2, 320, 320, 3), np.uint8)
    from compositing_service.inference_client import ClipAudio, InferCall

    short = speech_like(0.5, seed=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    for offset in (30, 10_000, 2**31 - 10):
        m = client.infer(
            InferCall(
                "alice",
                2,
                face_crops=crops,
                clip=ClipAudio(short.tobytes()),
                clip_frame_offset=offset,
            )
        )
        assert m.pixels.shape == (2, 320, 320, 3)
    assert time.monotonic() - t0 < 10.0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"grew {grown_mib:.0f} MiB"
    client.close()
    # frames past the clip's end follow the reference rule (zeros beyond its rows)
    oracle = Oracle(avatars_root / "alice")
    with grpc.insecure_channel(services.address) as ch:
        stub = cpb_grpc.CompositingServiceStub(ch)
        resp = stub.InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice", raw_audio=short.tobytes(), batch_size=4, clip_frame_offset=30
            )
        )
    assert resp.success, resp.error
    want = oracle.clip_frames(short, batch=4, offset=30)
    worst = min(
        psnr(decode_jpeg(a), jpeg_roundtrip(b, 95))
        for a, b in zip(resp.composited_frames, want, strict=True)
    )
    assert worst >= 50.0


def test_clip_span_matches_the_readiness_rule():
    for total in (3000, 8000, 16000 * 7 + 11):
        for first, last in ((0, 7), (30, 37), (10**9, 10**9 + 7)):
            start, stop = lookahead.clip_span(total, first, last)
            assert 0 <= start <= stop <= total and start % lookahead.TAIL_ALIGN == 0
            assert (
                stop - start
                <= lookahead.samples_needed(last) - lookahead.tail_offset(min(first, last))
                or first > total
            )


def test_offline_stream_sends_bounded_clips_whatever_its_length():
    """A long offline stream sent as fast as possible: every inference call's clip stays
    the same small size (constant cost per frame), and the audio held stays bounded."""
    from tests.test_stream_stages import FakeInference, requests, run_offline, session

    inference = FakeInference()
    s = session(inference)
    s.ingest.max_buffered = 16000 * 5  # backpressure past 5 s of unplanned audio
    x = np.tile(speech_like(5.0, seed=4), 24)  # 120 s
    frames = run_offline(s, requests(x, chunk=16000))
    assert len(frames) == windows.frames_of_samples(len(x))
    sizes = [len(c["clip"].pcm) // 4 for c in inference.calls]
    assert max(sizes) <= lookahead.samples_needed(20) - lookahead.tail_offset(0) + 16000
    assert max(sizes[:10]) * 1.5 >= max(sizes[-10:])  # the last calls cost the first ones


def test_realtime_pacer_queue_is_bounded():
    from compositing_service.streaming.output import RealtimePacer

    p = RealtimePacer(None, None, capacity=4)  # type: ignore[arg-type]
    assert not p._full()
    p._queue.extend(range(4))
    assert p._full()


# -- 3. admission control ------------------------------------------------------------------
def test_admission_refuses_past_the_bound_with_a_retry_hint():
    a = Admission("x", max_frames=10, max_bytes=1000, retry_after_ms=250)
    with a.admit(8):
        with pytest.raises(Overloaded) as err, a.admit(8):
            pass
        assert ("retry-after-ms", "250") in err.value.trailing_metadata()
        with a.admit(2):
            pass
    with a.admit(50):  # alone, a request larger than the bound is admitted
        pass
    a.close()
    with pytest.raises(Overloaded), a.admit(1):
        pass


def test_overloaded_compositing_refuses_at_once_with_resource_exhausted(
    services, avatars_root, shared_encoder
):
    from tests.conftest import service_config

    cfg = service_config(avatars_root, shared_encoder)
    cfg.compositing.admission.max_inflight_frames = 8
    comp = start_compositing(cfg, services.inference_address)
    x = speech_like(2.0, seed=5).tobytes()
    results: list = []

    def one():
        with grpc.insecure_channel(f"127.0.0.1:{comp.port}") as ch:
            stub = cpb_grpc.CompositingServiceStub(ch)
            t0 = time.monotonic()
            try:
                r = stub.InferBatchComposite(
                    cpb.CompositeBatchRequest(model_id="alice", raw_audio=x, batch_size=8),
                    timeout=60,
                )
                results.append(("ok" if r.success else r.error, time.monotonic() - t0, None))
            except grpc.RpcError as exc:
                md = dict(exc.trailing_metadata() or ())
                results.append((exc.code(), time.monotonic() - t0, md))

    try:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        comp.stop(0)
    ok = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert ok and refused and len(ok) + len(refused) == 6
    assert all("retry-after-ms" in r[2] for r in refused)
    assert max(r[1] for r in refused) < 2.0  # refused at once, not after queueing


# -- 4. deadlines --------------------------------------------------------------------------
def test_batcher_drops_items_whose_caller_has_gone():
    from inference_service.batching import CallerScope, DynamicBatcher, Expired, caller_scope

    ran: list[int] = []
    busy, release = threading.Event(), threading.Event()

    def run(x):
        ran.append(len(x))
        busy.set()
        release.wait(30)
        return x

    b = DynamicBatcher(run, max_batch=1, max_wait_s=0.0)
    t = threading.Thread(target=lambda: b(np.zeros((1, 2))))
    t.start()
    assert busy.wait(30)  # the first run is busy; the next item queues behind it
    token = caller_scope.set(CallerScope(deadline=time.monotonic() + 0.05))
    # the first run ends only after the queued item's deadline has passed
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        with pytest.raises(Expired):
            b(np.zeros((1, 2)))
    finally:
        caller_scope.reset(token)
        release.set()
        timer.cancel()
    t.join()
    assert ran == [1] and b.stats.expired == 1


def test_deadline_reaches_the_inference_call(services):
    """A caller whose deadline is too short for its batch: the server stops at its
    deadline (the answer is DEADLINE_EXCEEDED, or a failed response naming the deadline
    when the server answers first)."""
    with grpc.insecure_channel(services.address) as ch:
        stub = cpb_grpc.CompositingServiceStub(ch)
        try:
            resp = stub.InferBatchComposite(
                cpb.CompositeBatchRequest(
                    model_id="alice", raw_audio=speech_like(1.0).tobytes(), batch_size=32
                ),
                timeout=0.01,
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert not resp.success and "deadline" in resp.error


def test_inference_calls_end_by_the_callers_deadline(services):
    from compositing_service.inference_client import ClipAudio, DeadlineError, InferCall

    def call(deadline: float) -> InferCall:
        return InferCall("alice", 1, face_crops=crops, clip=clip, deadline=deadline)

    client = InferenceClient(services.inference_address, 1 << 26, 30, "uint8", retry_s=5.0)
    crops = np.zeros((1, 320, 320, 3), np.uint8)
    clip = ClipAudio(speech_like(0.5).tobytes())
    try:
        with pytest.raises(DeadlineError):
            client.infer(call(time.monotonic() - 1))
        assert client.infer(call(time.monotonic() + 30)).pixels.shape[0] == 1
    finally:
        client.close()
    # a service that is not there: retried (waiting for it) only within the deadline
    gone = InferenceClient(f"127.0.0.1:{free_port()}", 1 << 26, 30, "uint8", retry_s=20.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            gone.infer(call(time.monotonic() + 1.0))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 2.0 and gone.retries >= 1
    finally:
        gone.close()


# -- 5. faults: inference killed and restarted mid-stream ----------------------------------
def test_offline_stream_survives_an_inference_restart(tmp_path, avatars_root, shared_encoder):
    config = write_config(tmp_path, avatars_root, shared_encoder)
    inf_port = free_port()
    inf = spawn("inference_service", inf_port, config)
    from lipsync.config import load_config
    from lipsync.rpc.channel import wait_healthy

    comp = None
    try:
        wait_healthy(f"127.0.0.1:{inf_port}", 120, inf)
        cfg = load_config(config, env={})
        comp = start_compositing(cfg, f"127.0.0.1:{inf_port}")
        address = f"127.0.0.1:{comp.port}"
        clip = speech_like(4.0, seed=11)
        got: list[cpb.StreamFrame] = []
        first_frames = threading.Event()

        def requests():  # 100 ms of audio every 50 ms
            start = cpb.StreamStart(model_id="alice", start_frame_idx=2)
            return clip_requests(start, [chunked(clip, 1600)], pause_s=0.05)

        def read():
            with grpc.insecure_channel(address) as ch:
                for f in cpb_grpc.CompositingServiceStub(ch).StreamComposite(
                    requests(), timeout=120
                ):
                    got.append(f)
                    first_frames.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first_frames.wait(60)
        inf.send_signal(signal.SIGKILL)  # mid-stream
        inf.wait(10)
        wait_for(lambda: health_status(address, SERVICE_NAME) != 1, 10, "not ready")
        time.sleep(1.0)
        inf = spawn("inference_service", inf_port, config)
        reader.join(120)
        assert not reader.is_alive()
        wait_for(lambda: health_status(address, SERVICE_NAME) == 1, 10, "ready again")
        with grpc.insecure_channel(address) as ch:
            want = offline_frames(cpb_grpc.CompositingServiceStub(ch), clip, start=2)
        assert [f.index for f in got] == list(range(len(want)))
        worst = min(
            psnr(decode_jpeg(f.jpeg), decode_jpeg(w)) for f, w in zip(got, want, strict=True)
        )
        assert worst >= 45.0
        assert comp.servicer.inference.retries >= 1
    finally:
        if comp is not None:
            comp.stop(0)
        stop(inf)


def test_realtime_stream_idles_through_an_inference_outage_and_speaks_after():
    """Inference calls fail with UNAVAILABLE for a while: the realtime stream keeps sending
    frames at its pace (idle ones), drops that speech, and speaks again once calls work."""
    from tests.test_stream_stages import FakeInference, requests, session

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

    class Flaky(FakeInference):
        def __init__(self):
            super().__init__()
            self.down = True

        def infer(self, *a, **k):
            if self.down:
                raise Unavailable()
            return super().infer(*a, **k)

    inference = Flaky()
    s = session(inference, realtime=True)
    clip = speech_like(0.4, seed=22)
    spoke = threading.Event()

    def reqs():
        yield from requests(clip)  # during the outage: dropped
        time.sleep(0.8)
        inference.down = False
        yield from requests(clip)  # after it: spoken
        spoke.wait(10)

    reader = threading.Thread(target=s.feed, args=(reqs(),), daemon=True)
    reader.start()
    got = []
    t0 = time.monotonic()
    for f in s.frames():
        got.append((time.monotonic() - t0, f))
        if f.generated:
            spoke.set()
        if (spoke.is_set() and not f.generated) or time.monotonic() - t0 > 10:
            break
    s.cancel()
    assert spoke.is_set(), "it never spoke again"
    idx = [f.index for _, f in got]
    assert idx == list(range(len(idx)))  # no slot lost, no stall of the stream
    gaps = np.diff([t for t, _ in got])
    assert gaps.max() < 0.6  # frames kept coming through the outage


# -- 6. graceful, bounded shutdown ---------------------------------------------------------
def test_sigterm_with_open_and_malformed_streams_exits_within_the_grace(
    tmp_path, avatars_root, shared_encoder
):
    grace = 3.0
    config = write_config(tmp_path, avatars_root, shared_encoder, grace=grace)
    inf_port, comp_port = free_port(), free_port()
    env = {"INFERENCE_ADDRESS": f"127.0.0.1:{inf_port}"}
    inf = spawn("inference_service", inf_port, config)
    comp = spawn("compositing_service", comp_port, config, **env)
    address = f"127.0.0.1:{comp_port}"
    release = threading.Event()
    try:
        from lipsync.rpc.channel import wait_healthy

        wait_healthy(f"127.0.0.1:{inf_port}", 120, inf)
        wait_healthy(address, 120, comp)
        channel = grpc.insecure_channel(address)
        stub = cpb_grpc.CompositingServiceStub(channel)

        def never_closing(realtime: bool):
            yield cpb.StreamRequest(start=cpb.StreamStart(model_id="alice", realtime=realtime))
            yield cpb.StreamRequest(audio=speech_like(0.5).tobytes())
            release.wait(60)

        calls = [stub.StreamComposite(never_closing(rt)) for rt in (True, False)]
        # a malformed message on a raw stream
        raw = channel.stream_stream(
            "/compositing.CompositingService/StreamComposite",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

        def garbage():
            yield b"\x0a\xff\xff\xff\xff\x0f garbage"
            release.wait(60)

        bad = raw(garbage())
        for c in calls:
            c.initial_metadata()
        time.sleep(0.5)
        t0 = time.monotonic()
        comp.send_signal(signal.SIGTERM)
        wait_for(
            lambda: (
                health_status(address, timeout=0.5) == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            2.0,
            "NOT_SERVING after SIGTERM",
        )
        comp.wait(grace + 8.0)
        took = time.monotonic() - t0
        print(f"exit after SIGTERM: {took:.2f} s (grace {grace} s)")
        assert took < grace + 3.0
        release.set()
        for c in (*calls, bad):
            c.cancel()
        channel.close()
    finally:
        release.set()
        stop(comp)
        stop(inf)


# -- 7. hostile input ----------------------------------------------------------------------
def test_model_ids_are_anchored():
    assert check_model_id("demo") == "demo"
    for bad in ("demo\n", "demo\n\n", "\ndemo", "de mo", "..", "a" * 129, "a/b"):
        with pytest.raises(UnknownModelError):
            check_model_id(bad)


def test_avatar_folder_hostile_files(tmp_path):
    make_avatar(tmp_path, "a", n_frames=2)
    folder = tmp_path / "a"
    # a frame that is a symlink out of the avatar folder
    outside = tmp_path / "secret.png"
    outside.write_bytes((folder / "frames" / "0.png").read_bytes())
    (folder / "frames" / "2.png").symlink_to(outside)
    m = load_manifest(folder)
    with pytest.raises(AvatarError, match="outside"):
        m.frame_files()
    (folder / "frames" / "2.png").unlink()
    # a YAML alias bomb and an oversized manifest
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=False)
    )
    (folder / "avatar.yaml").write_text(bomb)
    t0 = time.monotonic()
    with pytest.raises(AvatarError, match=r"anchors|aliases"):
        load_manifest(folder)
    assert time.monotonic() - t0 < 0.5
    (folder / "avatar.yaml").write_text("name: a\n" + "#" * 70_000 + "\n")
    with pytest.raises(AvatarError, match="larger"):
        load_manifest(folder)


def test_image_dimensions_are_checked_from_the_header():
    import zlib

    def png(w, h):
        ihdr = b"IHDR" + w.to_bytes(4, "big") + h.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
        chunk = len(ihdr[4:]).to_bytes(4, "big") + ihdr + zlib.crc32(ihdr).to_bytes(4, "big")
        return b"\x89PNG\r\n\x1a\n" + chunk

    check_frame_header(png(640, 480), "ok")
    with pytest.raises(AvatarError, match="pixels"):
        check_frame_header(png(20000, 20000), "huge")
    with pytest.raises(AvatarError, match="not a PNG"):
        check_frame_header(b"GIF89a....", "gif")


def test_unknown_ids_do_not_rescan_each_time(tmp_path):
    make_avatar(tmp_path, "a", n_frames=2)
    cat = AvatarCatalog(tmp_path, rescan_interval_s=60)
    scans = []
    real = cat.rescan
    cat.rescan = lambda: (scans.append(1), real())[1]  # type: ignore[method-assign]
    for i in range(500):
        with pytest.raises(UnknownModelError):
            cat.get(f"nobody{i}")
    assert len(scans) == 0  # the scan at start is recent: none until the interval passes
    cat._last_scan -= 61
    with pytest.raises(UnknownModelError):
        cat.get("nobody")
    assert len(scans) == 1


def test_non_finite_visual_frames_are_refused(services):
    v = np.zeros((1, 6, 320, 320), np.float32)
    v[0, 0, 0, 0] = np.nan
    with grpc.insecure_channel(services.address) as ch:
        resp = cpb_grpc.CompositingServiceStub(ch).InferBatchComposite(
            cpb.CompositeBatchRequest(
                model_id="alice",
                visual_frames=v.tobytes(),
                audio_features=np.zeros((32, 16, 16), np.float32).tobytes(),
                batch_size=1,
            )
        )
    assert not resp.success and "NaN" in resp.error


def test_unknown_ids_keep_no_memory(services):
    """Unknown model ids on both RPC kinds: nothing is kept per id (tracemalloc)."""
    import gc
    import tracemalloc

    from lipsync.proto import common_pb2 as common

    with grpc.insecure_channel(services.address) as ch:
        stub = cpb_grpc.CompositingServiceStub(ch)

        def burst(n: int, tag: str) -> None:
            for i in range(n):
                with pytest.raises(grpc.RpcError):
                    stub.LoadModel(common.LoadModelRequest(model_id=f"{tag}{i}"), timeout=5)
                r = stub.InferBatchComposite(
                    cpb.CompositeBatchRequest(
                        model_id=f"{tag}x{i}", raw_audio=bytes(16000), batch_size=1
                    ),
                    timeout=5,
                )
                assert not r.success

        burst(100, "warm")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            burst(500, "unknown")
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert grown < 64 * 1024, f"grew {grown} bytes for 1000 unknown ids"


def test_inference_client_retries_shed_calls_with_the_hint_and_gives_up_on_others():
    class Refused(grpc.RpcError):
        def __init__(self, code, md=()):
            self._code, self._md = code, md

        def code(self):
            return self._code

        def trailing_metadata(self):
            return self._md

    client = InferenceClient(f"127.0.0.1:{free_port()}", 1 << 20, 10, "uint8", retry_s=5.0)
    calls = []

    def shed_twice(request, timeout, wait_for_ready):
        calls.append(timeout)
        if len(calls) <= 2:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "20"),))
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED)  # no hint: not retried

    client._infer = shed_twice
    with pytest.raises(grpc.RpcError) as err:
        client.call(ipb_request())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(calls) == 3 and client.retries == 2
    client.close()


def ipb_request():
    from lipsync.proto import inference_pb2 as ipb

    return ipb.InferRequest(model_id="alice", batch_size=1)
