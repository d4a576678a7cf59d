"""Execution providers fall back to CPU cleanly; inputs bind by shape; float16 conversion."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from inference_service.sessions import (
    SessionOptions,
    UNetBinding,
    create_session,
    resolve_providers,
    to_float16,
)
from tests.onnx_models import build_test_unet


def test_unavailable_gpu_providers_fall_back_to_cpu_with_a_log_line(caplog):
    caplog.set_level(logging.WARNING)
    providers = resolve_providers(["tensorrt", "cuda", "cpu"])
    names = [p if isinstance(p, str) else p[0] for p in providers]
    assert names[-1] == "CPUExecutionProvider"
    for gpu in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        assert (gpu in names) == (gpu in ort.get_available_providers())


def test_cpu_is_always_there_even_if_not_asked():
    names = [p if isinstance(p, str) else p[0] for p in resolve_providers(["nonexistent"])]
    assert names == ["CPUExecutionProvider"]


def test_unet_inputs_bind_by_shape_not_name(tmp_path):
    import onnx

    path = build_test_unet(tmp_path / "u.onnx")
    model = onnx.load(str(path))
    # Rename and swap the inputs: binding must still find visual (6 ch) and audio (32 ch).
    model.graph.input[0].name, model.graph.input[1].name = "zz_visual", "aa_audio"
    for node in model.graph.node:
        node.input[:] = [{"input": "zz_visual", "audio": "aa_audio"}.get(i, i) for i in node.input]
    inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend(reversed(inputs))
    swapped = tmp_path / "swapped.onnx"
    onnx.save(model, str(swapped))
    sess = create_session(swapped, SessionOptions(providers=("cpu",)))
    b = UNetBinding.of(sess)
    assert (b.visual, b.audio) == ("zz_visual", "aa_audio")


def test_float16_conversion_keeps_float32_io_and_close_outputs(tmp_path):
    path = build_test_unet(tmp_path / "u.onnx")
    rng = np.random.default_rng(0)
    feeds = {
        "input": rng.random((2, 6, 320, 320), dtype=np.float32),
        "audio": rng.standard_normal((2, 32, 16, 16)).astype(np.float32),
    }
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    half = ort.InferenceSession(to_float16(path), providers=["CPUExecutionProvider"])
    assert half.get_inputs()[0].type == "tensor(float)"
    out = half.run(None, feeds)[0]
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 5e-3


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_float16_is_undone_when_the_gpu_provider_cannot_start(tmp_path, monkeypatch, caplog):
    """onnxruntime-gpu installed but no usable GPU: CUDA is listed yet the session lands on
    the CPU, which then runs the float32 model (same outputs), not the float16 conversion."""
    import inference_service.sessions as sessions

    path = build_test_unet(tmp_path / "u.onnx")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        pytest.skip("a real CUDA provider is present")
    monkeypatch.setattr(
        sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available]
    )
    converted = []
    real = sessions.to_float16
    monkeypatch.setattr(sessions, "to_float16", lambda p: converted.append(p) or real(p))
    caplog.set_level(logging.WARNING)
    sess = create_session(path, SessionOptions(providers=("cuda", "cpu"), cuda_fp16=True), True)
    assert converted == [path]  # it was converted for CUDA...
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    assert "float32 model on the CPU" in caplog.text  # ... and undone, with a log line
    rng = np.random.default_rng(0)
    feeds = {
        "input": rng.random((1, 6, 320, 320), dtype=np.float32),
        "audio": rng.standard_normal((1, 32, 16, 16)).astype(np.float32),
    }
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(sess.run(None, feeds)[0], ref)
