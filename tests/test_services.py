"""Both services together over real gRPC on ephemeral ports, checked against the
reference semantics computed independently (tests/oracle.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from tests import reference_impl as ref
from tests.avatar_factory import speech_like
from tests.oracle import Oracle, decode_jpeg, jpeg_roundtrip, psnr

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stub(services):
    channel = grpc.insecure_channel(
        services.address,
        options=[
            ("grpc.max_send_message_length", 1 << 28),
            ("grpc.max_receive_message_length", 1 << 28),
        ],
    )
    yield cpb_grpc.CompositingServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return speech_like(1.6, seed=5)


QUALITY = 95  # tests/conftest.py service_config


def worst_psnr(jpegs, expected) -> float:
    """Worst-frame PSNR of served JPEGs against reference frames put through the same JPEG
    quality: the JPEG loss cancels, so any difference is a semantic one."""
    return min(
        psnr(decode_jpeg(j), jpeg_roundtrip(e, QUALITY))
        for j, e in zip(jpegs, expected, strict=True)
    )


def assert_frames_match(resp, expected, min_psnr=50.0):
    assert resp.success, resp.error
    assert len(resp.composited_frames) == len(expected)
    worst = worst_psnr(resp.composited_frames, expected)
    assert worst >= min_psnr, f"worst-frame PSNR {worst:.1f} dB"


def test_raw_audio_frames_match_reference(stub, services, avatars_root, clip):
    oracle = Oracle(avatars_root / "alice")
    # 1.6 s -> T = 129 mel frames, n = 37, the clip yields 39 frames; ask for 10 from frame 0.
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="alice", raw_audio=clip.tobytes(), batch_size=10, start_frame_idx=4
        )
    )
    expected = oracle.clip_frames(clip, batch=10, start=4, offset=0)
    assert_frames_match(resp, expected)
    assert list(resp.background_frame_indices) == [ref.ref_pingpong(4 + k, 7) for k in range(10)]


def test_frames_past_the_clip_end_and_offset(stub, avatars_root, clip):
    oracle = Oracle(avatars_root / "alice")
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="alice",
            raw_audio=clip.tobytes(),
            batch_size=8,
            start_frame_idx=11,
            clip_frame_offset=35,
        )
    )
    expected = oracle.clip_frames(clip, batch=8, start=11, offset=35)  # frames 35..42, clip has 39
    assert_frames_match(resp, expected)


def test_one_frame_slip_is_detected(stub, avatars_root, clip):
    """The comparison is sharp: a one-frame slip in audio does not pass."""
    oracle = Oracle(avatars_root / "alice")
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(model_id="alice", raw_audio=clip.tobytes(), batch_size=6)
    )
    slipped = [oracle.frame(k, oracle.audio_block(clip, k + 1)) for k in range(6)]
    assert worst_psnr(resp.composited_frames, slipped) < 40.0
    shifted = [oracle.frame(k + 1, oracle.audio_block(clip, k)) for k in range(6)]
    assert worst_psnr(resp.composited_frames, shifted) < 40.0


def test_int16_audio_at_44k1_is_resampled(stub, avatars_root):
    oracle = Oracle(avatars_root / "alice")
    sig44 = speech_like(1.2, sr=44100, seed=8)
    pcm16 = np.round(sig44 * 32767).astype("<i2")
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="alice",
            raw_audio=pcm16.tobytes(),
            sample_rate=44100,
            audio_encoding=cpb.PCM_S16LE,
            batch_size=5,
        )
    )
    wav16 = ref.ref_resample(pcm16.astype(np.float32) / 32768.0, 44100)
    assert_frames_match(resp, oracle.clip_frames(wav16, batch=5))


def test_shared_encoder_avatar(stub, avatars_root, shared_encoder, clip):
    oracle = Oracle(avatars_root / "bob", encoder_path=shared_encoder)
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="bob", raw_audio=clip.tobytes(), batch_size=9, start_frame_idx=2
        )
    )
    assert_frames_match(resp, oracle.clip_frames(clip, batch=9, start=2))


def test_existing_client_request_visual_frames_and_one_feature_block(stub, avatars_root):
    """The replaced system's Python client: random visual input, one audio block, batch 24."""
    rng = np.random.default_rng(0)
    visual = rng.random((24, 6, 320, 320), dtype=np.float32)
    block = rng.standard_normal((32, 16, 16)).astype(np.float32)
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id="alice",
            visual_frames=visual.tobytes(),
            audio_features=block.tobytes(),
            batch_size=24,
            start_frame_idx=0,
        )
    )
    assert resp.success, resp.error
    assert len(resp.composited_frames) == 24
    assert resp.total_time_ms > 0 and resp.inference_time_ms > 0
    oracle = Oracle(avatars_root / "alice")
    picked = (0, 13, 23)
    expected = [oracle.frame(k, block, visual=visual[k]) for k in picked]
    assert worst_psnr([resp.composited_frames[k] for k in picked], expected) >= 50.0


def test_per_frame_audio_features(stub, avatars_root):
    rng = np.random.default_rng(1)
    blocks = rng.standard_normal((3, 32, 16, 16)).astype(np.float32)
    resp = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(model_id="alice", audio_features=blocks.tobytes(), batch_size=3)
    )
    oracle = Oracle(avatars_root / "alice")
    assert_frames_match(resp, [oracle.frame(k, blocks[k]) for k in range(3)])


BAD_REQUESTS = {
    "unknown model": (dict(model_id="nobody", batch_size=2), "unknown model"),
    "path-like id": (dict(model_id="../alice", batch_size=2), "invalid model_id"),
    "absolute path id": (dict(model_id="/etc/passwd", batch_size=2), "invalid model_id"),
    "empty id": (dict(model_id="", batch_size=2), "model_id"),
    "zero batch": (dict(model_id="alice", batch_size=0), "batch_size"),
    "batch too large": (dict(model_id="alice", batch_size=10_000), "batch_size"),
    "no audio": (dict(model_id="alice", batch_size=2, no_audio=True), "no audio"),
    "wrong visual size": (
        dict(model_id="alice", batch_size=2, visual_frames=b"\0" * 1000),
        "visual_frames",
    ),
    "wrong feature size": (
        dict(model_id="alice", batch_size=2, audio_features=b"\0" * 100),
        "audio_features",
    ),
    "odd pcm bytes": (dict(model_id="alice", batch_size=2, raw_audio=b"\0" * 4001), "multiple"),
    "audio too short": (dict(model_id="alice", batch_size=2, raw_audio=b"\0" * 400), "short"),
    "nan audio": (
        dict(model_id="alice", batch_size=2, raw_audio=np.full(8000, np.nan, np.float32).tobytes()),
        "NaN",
    ),
    "bad sample rate": (
        dict(
            model_id="alice",
            batch_size=2,
            sample_rate=7,
            raw_audio=np.zeros(8000, np.float32).tobytes(),
        ),
        "rate",
    ),
    "too long audio": (
        dict(model_id="alice", batch_size=2, raw_audio=np.zeros(16000 * 31, np.float32).tobytes()),
        "long",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_fail_cleanly_and_service_keeps_serving(stub, clip, case):
    fields, needle = BAD_REQUESTS[case]
    fields = dict(fields)
    if not fields.pop("no_audio", False) and not any(
        k in fields for k in ("raw_audio", "audio_features")
    ):
        fields["raw_audio"] = clip.tobytes()
    resp = stub.InferBatchComposite(cpb.CompositeBatchRequest(**fields))
    assert not resp.success
    assert needle.lower() in resp.error.lower(), resp.error
    assert not resp.composited_frames
    health = stub.Health(cpb.HealthRequest())
    assert health.healthy and health.inference_server_healthy
    ok = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(model_id="alice", raw_audio=clip.tobytes(), batch_size=1)
    )
    assert ok.success, ok.error


def test_health_list_load_unload_stats(stub, services):
    h = stub.Health(cpb.HealthRequest())
    assert h.healthy and h.inference_server_healthy
    assert h.inference_server_url == services.cfg.compositing.inference_address
    assert h.version and h.max_models == services.cfg.inference.registry.max_models
    models = {m.model_id: m for m in stub.ListModels(cpb.ListModelsRequest()).models}
    assert set(models) == {"alice", "bob"}
    assert stub.LoadModel(cpb.LoadModelRequest(model_id="bob")).success
    models = {m.model_id: m for m in stub.ListModels(cpb.ListModelsRequest()).models}
    assert models["bob"].loaded and models["bob"].frames_cached
    assert (models["bob"].frame_count, models["bob"].frame_width, models["bob"].frame_height) == (
        5,
        200,
        240,
    )
    stats = stub.GetModelStats(cpb.GetModelStatsRequest(model_id="bob"))
    assert stats.stats[0].loaded and stats.stats[0].memory_bytes > 0
    assert stub.UnloadModel(cpb.UnloadModelRequest(model_id="bob")).success
    models = {m.model_id: m for m in stub.ListModels(cpb.ListModelsRequest()).models}
    assert not models["bob"].loaded
    for rpc, req in (
        (stub.LoadModel, cpb.LoadModelRequest(model_id="nobody")),
        (stub.UnloadModel, cpb.UnloadModelRequest(model_id="nobody")),
        (stub.GetModelStats, cpb.GetModelStatsRequest(model_id="nobody")),
        (stub.LoadModel, cpb.LoadModelRequest(model_id="../../etc")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            rpc(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_standard_grpc_health_on_both_ports(services):
    for address in (services.address, services.inference_address):
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_inference_down_is_a_clean_error(avatars_root, shared_encoder, clip):
    from compositing_service.server import start
    from tests.conftest import service_config

    cfg = service_config(avatars_root, shared_encoder)
    cfg.compositing.inference_address = "127.0.0.1:1"
    cfg.compositing.inference_timeout_s = 2.0
    comp = start(cfg, port=0, preload=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{comp.port}") as ch:
            stub = cpb_grpc.CompositingServiceStub(ch)
            resp = stub.InferBatchComposite(
                cpb.CompositeBatchRequest(model_id="alice", raw_audio=clip.tobytes(), batch_size=2)
            )
            assert not resp.success and "cannot reach the inference service" in resp.error
            h = stub.Health(cpb.HealthRequest())
            assert h.healthy and not h.inference_server_healthy
    finally:
        comp.stop(0)


def test_existing_clients_import_the_stub_modules():
    code = (
        "import compositing_pb2, compositing_pb2_grpc\n"
        "f = compositing_pb2.CompositeBatchRequest.DESCRIPTOR.fields_by_name\n"
        "print(f['start_frame_idx'].number)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(REPO / "shared_proto")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "5"


def test_large_batches_are_computed_in_pipelined_chunks(
    services, avatars_root, shared_encoder, clip
):
    """With 3-frame chunks, every kind of input is cut into chunks and reassembled."""
    from compositing_service.server import start
    from tests.conftest import service_config

    cfg = service_config(avatars_root, shared_encoder)
    cfg.compositing.inference_address = services.inference_address
    cfg.compositing.inference_chunk = 3
    comp = start(cfg, port=0, preload=False)
    oracle = Oracle(avatars_root / "alice")
    rng = np.random.default_rng(7)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{comp.port}") as ch:
            stub = cpb_grpc.CompositingServiceStub(ch)
            resp = stub.InferBatchComposite(
                cpb.CompositeBatchRequest(
                    model_id="alice",
                    raw_audio=clip.tobytes(),
                    batch_size=10,
                    start_frame_idx=2,
                    clip_frame_offset=5,
                )
            )
            assert_frames_match(resp, oracle.clip_frames(clip, batch=10, start=2, offset=5))
            blocks = rng.standard_normal((7, 32, 16, 16)).astype(np.float32)
            visual = rng.random((7, 6, 320, 320), dtype=np.float32)
            resp = stub.InferBatchComposite(
                cpb.CompositeBatchRequest(
                    model_id="alice",
                    audio_features=blocks.tobytes(),
                    visual_frames=visual.tobytes(),
                    batch_size=7,
                )
            )
            expected = [oracle.frame(k, blocks[k], visual=visual[k]) for k in range(7)]
            assert_frames_match(resp, expected)
    finally:
        comp.stop(0)
