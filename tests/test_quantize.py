"""int8 UNets (issue 20): `lipsync-avatar quantize` on a small test network (no PyTorch),
served through the real services when `inference.cpu_precision` (or avatar.yaml) says
int8, its mouths checked against the float32 service's; a corrupted int8 model, or one
that fails its check, is refused at load and the avatar is served in float32.

Bounds. The issue's bounds (mouth-region PSNR of int8 against float32: mean >= 38 dB,
worst frame >= 32 dB) are the quantize command's and the service's defaults, and the small
test network (one 3x3 convolution, a 1x1 audio convolution, sigmoid) meets them as they
are: the tests hold it to them, on served uint8 mouths. The demo avatar's and the
reference-size network's figures come from benchmarks/int8_quality.py
(docs/PERFORMANCE.md): too slow for the suite on two cores.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml

from compositing_service.inference_client import ClipAudio, InferCall, InferenceClient
from inference_service.engine import InferenceEngine
from lipsync.avatars.package import AvatarError, load_manifest, write_manifest
from lipsync.avatars.quantize import (
    CHECK_FILE,
    INT8_UNET_FILE,
    PSNR_CAP_DB,
    RECORD_FILE,
    QualityBounds,
    mouth_psnr,
    mouth_psnr_u8,
    read_record,
)
from lipsync.avatars.quantize.build import OP_TYPE_CANDIDATES
from lipsync.avatars.quantize.options import QuantizeOptions
from lipsync.avatars.speech_signal import speech_like
from lipsync.cli.avatar import main as avatar_cli
from lipsync.client import LipsyncClient
from lipsync.config import ConfigError, from_dict
from lipsync.core.visual import face_crop, inner
from tests.avatar_factory import make_avatar
from tests.conftest import Services, service_config, start_services, stop_services

BOUNDS = QualityBounds()  # 38 dB mean, 32 dB worst frame


def _copy_as(src: Path, name: str, **manifest: object) -> Path:
    """A copy of avatar package `src` named `name` (extra avatar.yaml keys: `manifest`)."""
    dst = src.parent / name
    shutil.copytree(src, dst)
    write_manifest(dst, name)
    if manifest:
        data = yaml.safe_load((dst / "avatar.yaml").read_text())
        data.update(manifest)
        (dst / "avatar.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice: quantized by the CLI; carol: a copy whose int8 model is corrupted; dave: a
    copy that asks for int8 in its avatar.yaml; erin: no int8 model."""
    root = tmp_path_factory.mktemp("int8_avatars")
    alice = make_avatar(root, "alice", n_frames=7, seed=0)
    assert avatar_cli(["quantize", str(alice), "--samples", "8", "--threads", "2"]) == 0
    carol = _copy_as(alice, "carol")
    data = bytearray((carol / INT8_UNET_FILE).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # inside the weights: parses, computes wrong
    (carol / INT8_UNET_FILE).write_bytes(bytes(data))
    _copy_as(alice, "dave", cpu_precision="int8")
    make_avatar(root, "erin", n_frames=5, seed=4)
    return root


@pytest.fixture(scope="module")
def shared_enc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.onnx_models import build_test_encoder

    return build_test_encoder(tmp_path_factory.mktemp("enc") / "audio_encoder.onnx", seed=9)


@pytest.fixture(scope="module")
def float_services(root: Path, shared_enc: Path) -> Iterator[Services]:
    cfg = service_config(root, shared_enc)
    cfg.compositing.transfer_dtype = "uint8"
    cfg.inference.registry.preload = []  # each test's first call loads (and logs)
    s = start_services(cfg)
    yield s
    stop_services(s)


@pytest.fixture(scope="module")
def int8_services(root: Path, shared_enc: Path) -> Iterator[Services]:
    cfg = service_config(root, shared_enc)
    cfg.compositing.transfer_dtype = "uint8"
    cfg.inference.cpu_precision = "int8"
    cfg.inference.registry.preload = []
    s = start_services(cfg)
    yield s
    stop_services(s)


def _stats(s: Services, model_id: str):  # type: ignore[no-untyped-def]
    with LipsyncClient(s.address) as client:
        client.load_model(model_id)
        (st,) = client.model_stats(model_id).stats
    return st


def _mouths(s: Services, model_id: str, clip: np.ndarray, offsets: range) -> np.ndarray:
    """Served mouths (uint8 [B,320,320,3]) of the avatar's own crops, straight from the
    inference service, for clip frames at `offsets` (8 frames each)."""
    m = load_manifest(s.cfg.avatars_path / model_id)
    frames = [cv2.imread(str(p)) for p in m.frame_files()]
    rects = m.load_crop_rects()
    client = InferenceClient(s.inference_address, 1 << 26, 30.0, "uint8")
    try:
        out = []
        for off in offsets:
            idx = [(off + k) % len(frames) for k in range(8)]
            crops = np.stack([inner(face_crop(frames[i], rects[i])) for i in idx])
            call = InferCall(
                model_id, 8, face_crops=crops, clip=ClipAudio(clip.tobytes()), clip_frame_offset=off
            )
            mouths = client.infer(call)
            out.append(mouths.pixels)
        return np.concatenate(out)
    finally:
        client.close()


def test_quantize_writes_int8_model_check_inputs_and_record(root: Path) -> None:
    alice = root / "alice"
    record = read_record(alice / RECORD_FILE)
    assert record.method.startswith("onnxruntime quantize_static, QDQ")
    assert record.per_channel and record.weight_type == "QInt8"
    assert record.activation_type == "QUInt8" and record.samples == 8
    assert record.calibrate_method.lower() == QuantizeOptions().calibration
    # the fastest operator set passed the check at once
    assert record.op_types == list(OP_TYPE_CANDIDATES[0]) and len(record.attempts) == 1
    assert record.onnxruntime and record.created
    assert record.check["passed"] is True
    assert record.check["mean_psnr_db"] >= BOUNDS.mean_psnr_db
    assert record.check["worst_psnr_db"] >= BOUNDS.worst_psnr_db
    model = onnx.load(str(alice / INT8_UNET_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "weights are stored as int8"
    # per channel: the 3x3 convolution's weight scale has one value per output channel
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert any(v.shape == (3,) for k, v in scales.items() if "scale" in k)
    with np.load(alice / CHECK_FILE) as z:
        assert z["crops"].shape == (8, 320, 320, 3) and z["audio"].shape == (8, 32, 16, 16)
    assert load_manifest(alice).unet_int8 == (alice / INT8_UNET_FILE).resolve()
    assert load_manifest(root / "erin").unet_int8 is None


def test_int8_served_within_bounds_of_float(
    float_services: Services, int8_services: Services
) -> None:
    st = _stats(int8_services, "alice")
    assert st.unet_precision == "int8", st.precision_note
    assert "PSNR" in st.precision_note
    assert _stats(float_services, "alice").unet_precision == "float32"
    clip = speech_like(2.0, seed=5)
    ref = _mouths(float_services, "alice", clip, range(0, 40, 8))
    got = _mouths(int8_services, "alice", clip, range(0, 40, 8))
    psnr = mouth_psnr_u8(ref, got)
    assert len(psnr) == 40
    assert psnr.mean() >= BOUNDS.mean_psnr_db and psnr.min() >= BOUNDS.worst_psnr_db, psnr
    assert psnr.max() < PSNR_CAP_DB, "the int8 model is really another model"
    # and through the compositing service: JPEG frames of the int8 mouths
    with LipsyncClient(int8_services.address) as client:
        batch = client.composite_batch("alice", 8, audio=clip)
    assert len(batch.frames) == 8
    assert cv2.imdecode(np.frombuffer(batch.frames[0], np.uint8), cv2.IMREAD_COLOR) is not None


def test_avatar_yaml_chooses_int8_per_avatar(float_services: Services) -> None:
    assert _stats(float_services, "dave").unet_precision == "int8"


def test_no_int8_model_serves_float_and_says_so(int8_services: Services) -> None:
    st = _stats(int8_services, "erin")
    assert st.unet_precision == "float32"
    assert "no int8 UNet" in st.precision_note


def test_corrupted_int8_model_refused_avatar_served_in_float(
    float_services: Services, int8_services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="inference_service.networks"):
        st = _stats(int8_services, "carol")
    assert st.loaded and st.unet_precision == "float32"
    assert "does not match its calibration record" in st.precision_note
    assert any("refused" in r.getMessage() and "carol" in r.getMessage() for r in caplog.records)
    # carol is alice's copy: served in float32 it gives alice's float32 frames exactly
    clip = speech_like(1.5, seed=6)
    ref = _mouths(float_services, "alice", clip, range(0, 16, 8))
    got = _mouths(int8_services, "carol", clip, range(0, 16, 8))
    np.testing.assert_array_equal(got, ref)
    with LipsyncClient(int8_services.address) as client:
        assert len(client.composite_batch("carol", 4, audio=clip).frames) == 4


def _engine(root: Path, shared_enc: Path, **inference: object) -> InferenceEngine:
    cfg = service_config(root, shared_enc)
    for k, v in inference.items():
        setattr(cfg.inference, k, v)
    return InferenceEngine(cfg)


def test_int8_failing_its_check_is_refused(root: Path, shared_enc: Path) -> None:
    engine = _engine(root, shared_enc, cpu_precision="int8", int8_min_mean_psnr_db=90.0)
    try:
        nets = engine.registry.get("alice")
        assert nets.precision == "float32"
        assert "calibration check failed" in nets.precision_note
        assert "needs >= 90" in nets.precision_note
    finally:
        engine.close()


def test_stale_record_refused(root: Path, shared_enc: Path, tmp_path: Path) -> None:
    """A float model changed after quantizing: the int8 model is not its int8 model."""
    frank = _copy_as(root / "alice", "frank")
    try:
        from tests.onnx_models import build_test_unet

        build_test_unet(frank / "unet.onnx", seed=7)
        engine = _engine(root, shared_enc, cpu_precision="int8")
        try:
            nets = engine.registry.get("frank")
            assert nets.precision == "float32"
            assert "changed since" in nets.precision_note
        finally:
            engine.close()
        (frank / RECORD_FILE).write_text(json.dumps({"format": 1}))
        engine = _engine(root, shared_enc, cpu_precision="int8")
        try:
            assert "sha256" in engine.registry.get("frank").precision_note
        finally:
            engine.close()
    finally:
        shutil.rmtree(frank)


def test_quantize_refuses_and_writes_nothing_when_the_check_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_avatar(tmp_path, "gina", n_frames=3, seed=2)
    rc = avatar_cli(["quantize", str(folder), "--samples", "2", "--min-psnr", "95"])
    assert rc == 2
    printed = capsys.readouterr()
    assert "failed its check, nothing written" in printed.err
    # every operator set was tried (each failed) before giving up
    assert "tried first Conv, Relu, LeakyRelu, Resize, Concat:" in printed.out
    assert not (folder / INT8_UNET_FILE).exists() and not (folder / RECORD_FILE).exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_quantize_without_audio_encoder_needs_one(
    tmp_path: Path, shared_enc: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_avatar(tmp_path, "hal", n_frames=3, seed=2, own_encoder=False)
    assert avatar_cli(["quantize", str(folder), "--samples", "2"]) == 2
    assert "--audio-encoder" in capsys.readouterr().err
    args = ["quantize", str(folder), "--samples", "2", "--audio-encoder", str(shared_enc)]
    assert avatar_cli([*args, "--keep-float", "first,last"]) == 0
    assert read_record(folder / RECORD_FILE).nodes_excluded  # the convolutions kept float


def test_precision_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpu_precision"):
        from_dict({"inference": {"cpu_precision": "int4"}})
    assert from_dict({"inference": {"cpu_precision": "int8"}}).inference.cpu_precision == "int8"
    folder = make_avatar(tmp_path, "ivy", n_frames=2)
    (folder / "avatar.yaml").write_text(
        (folder / "avatar.yaml").read_text() + "cpu_precision: fp4\n"
    )
    with pytest.raises(AvatarError, match="cpu_precision"):
        load_manifest(folder)


def test_mouth_psnr() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 320, 320), dtype=np.float32)
    assert np.all(mouth_psnr(a, a) == PSNR_CAP_DB)
    u = rng.integers(0, 250, (2, 320, 320, 3), dtype=np.uint8)
    v = u.copy()
    v[1, 5:310, 5:315] += 5  # every mouth pixel off by 5: 20 log10(255 / 5) dB
    v[0, :5] = 0  # outside the mouth region: not counted
    p = mouth_psnr_u8(u, v)
    assert p[0] == PSNR_CAP_DB
    assert p[1] == pytest.approx(20 * np.log10(255 / 5))
