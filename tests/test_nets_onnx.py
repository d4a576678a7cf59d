"""The torch-free ONNX builder of the SyncTalk_2D reference networks (no PyTorch needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from lipsync.avatars.nets import onnx_builder as ob

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
# The reference checkpoints' key tables (docs/SEMANTICS.md, "Checkpoint layout").
REFERENCE_DIR = REPO / "docs" / "reference"
TSV = {
    ob.KIND_UNET: "unet328_ave_state_dict.tsv",
    ob.KIND_AUDIO_ENCODER: "audio_encoder_state_dict.tsv",
}


def reference_table(kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """The reference key table (key, shape) in file order."""
    rows = []
    for line in (REFERENCE_DIR / TSV[kind]).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape.strip()))))
    return rows


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ob.KINDS)
def test_key_table_equals_reference_tsv(kind: str) -> None:
    ref = reference_table(kind)
    assert list(ob.expected_state_dict_shapes(kind).items()) == ref


def test_parameter_counts_match_the_spec() -> None:
    # docs/SEMANTICS.md: 12.25 M (UNet) and 2.82 M (audio encoder) parameters, rounded.
    assert ob.parameter_count(ob.KIND_UNET) == pytest.approx(12.25e6, rel=0.01)
    assert ob.parameter_count(ob.KIND_AUDIO_ENCODER) == pytest.approx(2.82e6, rel=0.01)


@pytest.mark.parametrize("kind", ob.KINDS)
def test_random_state_dict_has_the_reference_layout(kind: str) -> None:
    sd = ob.random_reference_state_dict(kind, seed=3)
    expected = ob.expected_state_dict_shapes(kind)
    assert list(sd) == list(expected)
    for key, arr in sd.items():
        assert arr.shape == expected[key], key
        assert arr.dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32)
    again = ob.random_reference_state_dict(kind, seed=3)
    other = ob.random_reference_state_dict(kind, seed=4)
    key = next(iter(sd))
    assert np.array_equal(sd[key], again[key])
    assert not np.array_equal(sd[key], other[key])


def test_check_state_dict_names_the_offending_keys() -> None:
    sd = ob.random_reference_state_dict(ob.KIND_AUDIO_ENCODER, 0)
    ob.check_state_dict(sd, ob.KIND_AUDIO_ENCODER)

    missing = dict(sd)
    del missing["audio_encoder.5.conv_block.1.running_var"]
    with pytest.raises(ob.StateDictError, match=r"1 missing key.*5\.conv_block\.1\.running_var"):
        ob.check_state_dict(missing, ob.KIND_AUDIO_ENCODER)

    extra = {**sd, "audio_encoder.13.conv_block.0.weight": np.zeros(3, np.float32)}
    with pytest.raises(ob.StateDictError, match=r"unexpected key.*audio_encoder\.13"):
        ob.check_state_dict(extra, ob.KIND_AUDIO_ENCODER)

    wrong = {**sd, "audio_encoder.0.conv_block.0.weight": np.zeros((32, 2, 3, 3), np.float32)}
    with pytest.raises(ob.StateDictError, match=r"wrong shape.*\(32, 1, 3, 3\), got \(32, 2, 3"):
        ob.build_audio_encoder(wrong)

    nan = dict(sd)
    nan["audio_encoder.3.conv_block.0.bias"] = np.full(64, np.nan, np.float32)
    with pytest.raises(ob.StateDictError, match=r"non-finite.*3\.conv_block\.0\.bias"):
        ob.check_state_dict(nan, ob.KIND_AUDIO_ENCODER)

    with pytest.raises(ValueError, match="unknown network kind"):
        ob.expected_state_dict_shapes("unet256")


# --- the UNet --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_model() -> onnx.ModelProto:
    return ob.build_reference_unet(seed=0)


@pytest.fixture(scope="module")
def unet_session(unet_model: onnx.ModelProto) -> ort.InferenceSession:
    return _session(unet_model)


def _dims(vi: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_unet_model_is_valid_with_a_dynamic_batch(unet_model: onnx.ModelProto) -> None:
    onnx.checker.check_model(unet_model, full_check=True)
    assert unet_model.opset_import[0].version >= 17
    ins = {vi.name: _dims(vi) for vi in unet_model.graph.input}
    outs = {vi.name: _dims(vi) for vi in unet_model.graph.output}
    assert ins == {"input": ["batch", 6, 320, 320], "audio": ["batch", 32, 16, 16]}
    assert outs == {"output": ["batch", 3, 320, 320]}
    # BatchNorm is folded: no BatchNormalization nodes, every conv has a bias.
    ops = [n.op_type for n in unet_model.graph.node]
    assert "BatchNormalization" not in ops
    assert all(len(n.input) == 3 for n in unet_model.graph.node if n.op_type == "Conv")
    assert ops.count("Resize") == 5 and ops[-1] == "Sigmoid"
    n_weights = sum(int(np.prod(t.dims)) for t in unet_model.graph.initializer)
    assert n_weights < ob.parameter_count(ob.KIND_UNET)  # folded BN: fewer than trained


def test_unet_runs_at_batch_1_and_2(unet_session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 6, 320, 320)).astype(np.float32)
    a = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    (out2,) = unet_session.run(None, {"input": x, "audio": a})
    (out1,) = unet_session.run(None, {"input": x[:1], "audio": a[:1]})
    assert out2.shape == (2, 3, 320, 320) and out2.dtype == np.float32
    assert out1.shape == (1, 3, 320, 320)
    np.testing.assert_allclose(out1[0], out2[0], atol=1e-5)
    assert np.all((out2 >= 0) & (out2 <= 1))
    # Random weights are scaled so the output is neither flat 0.5 nor saturated.
    assert 0.05 < float(out2.std()) < 0.45
    assert float(np.mean((out2 < 0.01) | (out2 > 0.99))) < 0.05
    assert float(np.abs(out2 - 0.5).max()) > 0.2
    # The audio reaches the output, and so do both image halves.
    assert float(np.abs(out2[0] - out2[1]).max()) > 1e-2


def test_unet_output_depends_on_the_audio(unet_session: ort.InferenceSession) -> None:
    rng = np.random.default_rng(1)
    x = np.repeat(rng.uniform(0, 1, (1, 6, 320, 320)).astype(np.float32), 2, axis=0)
    a = rng.standard_normal((2, 32, 16, 16)).astype(np.float32)
    (out,) = unet_session.run(None, {"input": x, "audio": a})
    assert float(np.abs(out[0] - out[1]).max()) > 1e-2


def test_save_model_round_trip(unet_model: onnx.ModelProto, tmp_path: Path) -> None:
    path = ob.save_model(unet_model, tmp_path / "sub" / "unet.onnx")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = onnx.load(str(path))
    assert loaded.SerializeToString() == unet_model.SerializeToString()


# --- the audio encoder -----------------------------------------------------------------------


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple[int, int], pad: int):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    win = win[:, :, :: stride[0], :: stride[1]]
    return np.einsum("bchwij,ocij->bohw", win, w, optimize=True) + b[None, :, None, None]


def _numpy_audio_encoder(sd: dict[str, np.ndarray], mel: np.ndarray) -> np.ndarray:
    """Direct float64 evaluation of the reference encoder (conv, BN, residual, ReLU)."""
    x = mel.astype(np.float64)
    for i, (_, _, stride, pad, _, residual) in enumerate(ob.AUDIO_ENCODER_BLOCKS):
        p = f"audio_encoder.{i}.conv_block"
        w, b = sd[f"{p}.0.weight"].astype(np.float64), sd[f"{p}.0.bias"].astype(np.float64)
        y = _conv2d(x, w, b, stride, pad)
        g, beta = sd[f"{p}.1.weight"], sd[f"{p}.1.bias"]
        mean, var = sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"]
        y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
        y = y * g[:, None, None] + beta[:, None, None]
        if residual:
            y = y + x
        x = np.maximum(y, 0)
    assert x.shape[2:] == (1, 1)
    return x[:, :, 0, 0]


def test_audio_encoder_model_runs_and_matches_a_numpy_reference() -> None:
    sd = ob.random_reference_state_dict(ob.KIND_AUDIO_ENCODER, seed=5)
    model = ob.build_audio_encoder(sd)
    onnx.checker.check_model(model, full_check=True)
    assert [(vi.name, _dims(vi)) for vi in model.graph.input] == [("mel", ["batch", 1, 80, 16])]
    assert [(vi.name, _dims(vi)) for vi in model.graph.output] == [("features", ["batch", 512])]
    sess = _session(model)
    rng = np.random.default_rng(2)
    mel = rng.uniform(-4, 4, (3, 1, 80, 16)).astype(np.float32)
    (f3,) = sess.run(None, {"mel": mel})
    (f1,) = sess.run(None, {"mel": mel[:1]})
    assert f3.shape == (3, 512) and f1.shape == (1, 512)
    np.testing.assert_allclose(f1[0], f3[0], atol=1e-5)
    ref = _numpy_audio_encoder(sd, mel)
    assert float(np.abs(f3 - ref).max()) < 1e-4
    assert np.all(f3 >= 0) and 0.1 < float(f3.std()) < 50  # O(1) features, not dead


def test_reference_audio_encoder_convenience_builder() -> None:
    model = ob.build_reference_audio_encoder(seed=1)
    (f,) = _session(model).run(None, {"mel": np.zeros((2, 1, 80, 16), np.float32)})
    assert f.shape == (2, 512) and np.all(np.isfinite(f))


def test_builder_and_tools_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import lipsync.avatars.nets, lipsync.avatars.convert\n"
        "import lipsync.avatars.synctalk_import, lipsync.cli.avatar\n"
        "from lipsync.avatars.nets import build_reference_audio_encoder\n"
        "build_reference_audio_encoder(0)\n"
        "try:\n"
        "    import lipsync.avatars.nets.torch_nets\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
