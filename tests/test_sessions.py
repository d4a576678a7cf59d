"""Execution providers fall back to CPU cleanly; inputs bind by shape; float16 conversion."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

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
