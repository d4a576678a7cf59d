"""Small ONNX networks with the reference I/O contract, built with the `onnx` package
(no PyTorch). Their outputs depend on every input, so a wrong crop, mask, audio
window or frame offset shows up in the composited frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_test_unet(path: Path, seed: int = 0) -> Path:
    """[B,6,320,320] + [B,32,16,16] -> [B,3,320,320] = sigmoid(conv3x3(visual) + audio term).

    The audio term is spatially varying (a 1x1 conv of the audio block, upsampled 20x),
    so different audio windows give visibly different mouths.
    """
    rng = np.random.default_rng(seed)
    w_vis = (rng.standard_normal((3, 6, 3, 3)) * 0.4).astype(np.float32)
    b_vis = np.array([-0.2, 0.1, 0.0], np.float32)
    w_aud = (rng.standard_normal((3, 32, 1, 1)) * 0.5).astype(np.float32)
    scales = np.array([1, 1, 20, 20], np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w_vis", "b_vis"], ["v"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["audio", "w_aud"], ["a16"]),
        helper.make_node("Resize", ["a16", "", "scales"], ["a320"], mode="nearest"),
        helper.make_node("Add", ["v", "a320"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "test_unet",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, 320, 320]),
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", 32, 16, 16]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, 320, 320])],
        initializer=[
            numpy_helper.from_array(w_vis, "w_vis"),
            numpy_helper.from_array(b_vis, "b_vis"),
            numpy_helper.from_array(w_aud, "w_aud"),
            numpy_helper.from_array(scales, "scales"),
        ],
    )
    return _save(graph, path)


def build_test_encoder(path: Path, seed: int = 1) -> Path:
    """[B,1,80,16] -> [B,512] = tanh(flatten(mel) @ W / 8)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1280, 512)) / np.sqrt(1280) / 2).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["mel"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["h"]),
        helper.make_node("Tanh", ["h"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "test_audio_encoder",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 1, 80, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 512])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)
