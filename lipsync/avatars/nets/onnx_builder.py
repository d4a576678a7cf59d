"""Build the SyncTalk_2D reference networks as ONNX graphs, without PyTorch.

Two networks (see `lipsync.avatars.nets.torch_nets` for the same networks as PyTorch modules and
the architecture notes):

- ``"unet"``: the 328 UNet with the "ave" audio branch. Inputs ``input`` [B, 6, 320, 320]
  and ``audio`` [B, 32, 16, 16] (float32), output ``output`` [B, 3, 320, 320] in [0, 1].
- ``"audio_encoder"``: the "ave" audio encoder. Input ``mel`` [B, 1, 80, 16], output
  ``features`` [B, 512].

The layer layout is written down here (`unet_layout`, `audio_encoder_layout`) and is the
single source of the expected state-dict table (`expected_state_dict_shapes`), of the random
weights (`random_reference_state_dict`) and of the graph (`build_model`). The table equals the
reference key tables key for key and shape for shape (tests compare it with the .tsv files
when they are present).

The graph is built for inference: every BatchNorm (eval mode, eps 1e-5) is folded into the
convolution before it, in float64, then stored as float32. The batch axis is dynamic
(``batch``); spatial sizes are fixed. Opset 17 by default.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KIND_UNET = "unet"
KIND_AUDIO_ENCODER = "audio_encoder"
KINDS = (KIND_UNET, KIND_AUDIO_ENCODER)

UNET_INPUT = "input"
UNET_AUDIO = "audio"
UNET_OUTPUT = "output"
AUDIO_ENCODER_INPUT = "mel"
AUDIO_ENCODER_OUTPUT = "features"

UNET_INPUT_SHAPE = (6, 320, 320)
UNET_AUDIO_SHAPE = (32, 16, 16)
UNET_OUTPUT_SHAPE = (3, 320, 320)
AUDIO_ENCODER_INPUT_SHAPE = (1, 80, 16)
AUDIO_ENCODER_OUTPUT_SHAPE = (512,)

BN_EPS = 1e-5
DEFAULT_OPSET = 17
BATCH_DIM = "batch"

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class StateDictError(ValueError):
    """A state dict does not match the reference layout (missing/unexpected keys, shapes)."""


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def _bn_shapes(prefix: str, ch: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    for suffix in _BN_SUFFIXES:
        yield f"{prefix}.{suffix}", (() if suffix == "num_batches_tracked" else (ch,))


@dataclass(frozen=True)
class InvertedResidualSpec:
    """MobileNetV2 block ``<prefix>.conv`` = Sequential(0 conv1x1, 1 BN, 2 ReLU, 3 dw3x3,
    4 BN, 5 ReLU, 6 conv1x1, 7 BN), convs without bias, optional residual add."""

    prefix: str
    inp: int
    oup: int
    stride: int = 1
    residual: bool = False
    expand: int = 2

    @property
    def hidden(self) -> int:
        return self.inp * self.expand

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        p, h = f"{self.prefix}.conv", self.hidden
        yield f"{p}.0.weight", (h, self.inp, 1, 1)
        yield from _bn_shapes(f"{p}.1", h)
        yield f"{p}.3.weight", (h, 1, 3, 3)
        yield from _bn_shapes(f"{p}.4", h)
        yield f"{p}.6.weight", (self.oup, h, 1, 1)
        yield from _bn_shapes(f"{p}.7", self.oup)


@dataclass(frozen=True)
class ConvBNSpec:
    """Conv2d (with bias) ``conv`` + BatchNorm2d ``bn`` + optional residual add + ReLU."""

    conv: str
    bn: str
    inp: int
    oup: int
    kernel: int = 3
    stride: tuple[int, int] = (1, 1)
    padding: int = 1
    residual: bool = False
    relu: bool = True

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield f"{self.conv}.weight", (self.oup, self.inp, self.kernel, self.kernel)
        yield f"{self.conv}.bias", (self.oup,)
        yield from _bn_shapes(self.bn, self.oup)


@dataclass(frozen=True)
class ConvSpec:
    """A plain Conv2d with bias (the UNet's 1x1 ``outc``)."""

    prefix: str
    inp: int
    oup: int
    kernel: int = 1

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield f"{self.prefix}.weight", (self.oup, self.inp, self.kernel, self.kernel)
        yield f"{self.prefix}.bias", (self.oup,)


Spec = InvertedResidualSpec | ConvBNSpec | ConvSpec

UNET_CHANNELS = (32, 64, 128, 256, 512)
# (in, out) channels of down1..down5 and up1..up5 (in = upsampled + skip, concatenated).
UNET_DOWN = ((32, 32), (32, 64), (64, 128), (128, 256), (256, 512))
UNET_UP = ((512, 128), (256, 64), (128, 32), (64, 32), (64, 16))


def _double_conv(prefix: str, inp: int, oup: int, stride: int) -> list[Spec]:
    return [
        InvertedResidualSpec(f"{prefix}.double_conv.0", inp, oup, stride, residual=False),
        InvertedResidualSpec(f"{prefix}.double_conv.1", oup, oup, 1, residual=True),
    ]


def unet_layout() -> dict[str, list[Spec]]:
    """The UNet's submodules in registration (= state-dict) order, each a sequential chain."""
    ch = UNET_CHANNELS
    a = "audio_model"
    layout: dict[str, list[Spec]] = {
        a: [
            InvertedResidualSpec(f"{a}.conv1", ch[0], ch[1]),
            InvertedResidualSpec(f"{a}.conv2", ch[1], ch[2]),
            ConvBNSpec(f"{a}.conv3", f"{a}.bn3", ch[2], ch[3], 3, (1, 1), 1),
            InvertedResidualSpec(f"{a}.conv4", ch[3], ch[3], residual=True),
            ConvBNSpec(f"{a}.conv5", f"{a}.bn5", ch[3], ch[4], 3, (2, 2), 3),
            InvertedResidualSpec(f"{a}.conv6", ch[4], ch[4], residual=True),
            InvertedResidualSpec(f"{a}.conv7", ch[4], ch[4], residual=True),
        ],
        "fuse_conv": _double_conv("fuse_conv.0", 2 * ch[4], ch[4], 1)
        + _double_conv("fuse_conv.1", ch[4], ch[3], 1),
        "inc": [InvertedResidualSpec("inc.inconv.0", 6, ch[0])],
    }
    for i, (cin, cout) in enumerate(UNET_DOWN, 1):
        layout[f"down{i}"] = _double_conv(f"down{i}.maxpool_conv.0", cin, cout, 2)
    for i, (cin, cout) in enumerate(UNET_UP, 1):
        layout[f"up{i}"] = _double_conv(f"up{i}.conv", cin, cout, 1)
    layout["outc"] = [ConvSpec("outc.conv", UNET_UP[-1][1], 3)]
    return layout


# (in, out, stride, padding, kernel, residual) of the 13 audio encoder blocks.
AUDIO_ENCODER_BLOCKS: tuple[tuple[int, int, tuple[int, int], int, int, bool], ...] = (
    (1, 32, (1, 1), 1, 3, False),
    (32, 32, (1, 1), 1, 3, True),
    (32, 32, (1, 1), 1, 3, True),
    (32, 64, (3, 1), 1, 3, False),
    (64, 64, (1, 1), 1, 3, True),
    (64, 64, (1, 1), 1, 3, True),
    (64, 128, (3, 3), 1, 3, False),
    (128, 128, (1, 1), 1, 3, True),
    (128, 128, (1, 1), 1, 3, True),
    (128, 256, (3, 2), 1, 3, False),
    (256, 256, (1, 1), 1, 3, True),
    (256, 512, (1, 1), 0, 3, False),
    (512, 512, (1, 1), 0, 1, False),
)


def audio_encoder_layout() -> dict[str, list[Spec]]:
    """The audio encoder: one sequential chain ``audio_encoder.<i>.conv_block.{0,1}``."""
    specs: list[Spec] = [
        ConvBNSpec(
            f"audio_encoder.{i}.conv_block.0",
            f"audio_encoder.{i}.conv_block.1",
            cin,
            cout,
            kernel,
            stride,
            pad,
            residual=res,
        )
        for i, (cin, cout, stride, pad, kernel, res) in enumerate(AUDIO_ENCODER_BLOCKS)
    ]
    return {"audio_encoder": specs}


def layout(kind: str) -> dict[str, list[Spec]]:
    if kind == KIND_UNET:
        return unet_layout()
    if kind == KIND_AUDIO_ENCODER:
        return audio_encoder_layout()
    raise ValueError(f"unknown network kind {kind!r}; expected one of {KINDS}")


def expected_state_dict_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """The reference state-dict table of `kind` (ordered key -> shape), as in the .tsv files."""
    table: dict[str, tuple[int, ...]] = {}
    for specs in layout(kind).values():
        for spec in specs:
            for key, shape in spec.shapes():
                if key in table:  # a layout bug, never user input
                    raise AssertionError(f"duplicate key {key}")
                table[key] = shape
    return table


def parameter_count(kind: str) -> int:
    """Trainable parameters (conv weights/biases, BN weights/biases; no running stats)."""
    return sum(
        int(np.prod(shape))
        for key, shape in expected_state_dict_shapes(kind).items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def _describe(kind: str) -> str:
    return "UNet (328, ave)" if kind == KIND_UNET else "audio encoder (ave)"


def _first(items: list[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(state_dict: Mapping[str, np.ndarray], kind: str) -> None:
    """Raise StateDictError unless `state_dict` has exactly the reference keys and shapes
    and finite values. The message lists the first few offending keys of each sort."""
    expected = expected_state_dict_shapes(kind)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: expected {expected[k]}, got {tuple(np.shape(v))}"
        for k, v in state_dict.items()
        if k in expected and tuple(np.shape(v)) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {_first(wrong)}")
    if problems:
        raise StateDictError(
            f"state dict does not match the SyncTalk_2D {_describe(kind)}: " + "; ".join(problems)
        )
    bad = [
        k
        for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked") and not np.all(np.isfinite(np.asarray(v)))
    ]
    if bad:
        raise StateDictError(f"non-finite values (NaN/inf) in {len(bad)} tensor(s): {_first(bad)}")


# --------------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------------


def random_reference_state_dict(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible random weights with the reference keys and shapes (float32; the
    ``num_batches_tracked`` entries are int64 scalars).

    Convolutions are He-initialised (std sqrt(2 / fan_in)) where their input went through a
    ReLU and LeCun-initialised (std sqrt(1 / fan_in)) where it did not (the network input
    and the outputs of blocks that end with a BN); conv biases and BN biases are small,
    BN weights ~1, running means ~0 and running variances ~1. The last BN of every residual
    branch gets a weight ~0.35 so the residual adds do not make the activations grow with
    depth: the UNet's output spreads over (0, 1) instead of sitting at 0.5 or saturating,
    and the audio features stay O(1).
    """
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(key: str, shape: tuple[int, ...], after_relu: bool = True) -> None:
        fan_in = int(np.prod(shape[1:]))
        std = np.sqrt((2.0 if after_relu else 1.0) / fan_in)
        sd[key] = rng.normal(0.0, std, size=shape).astype(np.float32)

    def bias(key: str, n: int, std: float = 0.02) -> None:
        sd[key] = rng.normal(0.0, std, size=(n,)).astype(np.float32)

    def bn(prefix: str, n: int, gain: float = 1.0) -> None:
        sd[f"{prefix}.weight"] = (gain * rng.uniform(0.8, 1.2, size=n)).astype(np.float32)
        bias(f"{prefix}.bias", n, 0.05)
        bias(f"{prefix}.running_mean", n, 0.05)
        sd[f"{prefix}.running_var"] = rng.uniform(0.8, 1.2, size=n).astype(np.float32)
        sd[f"{prefix}.num_batches_tracked"] = np.array(int(rng.integers(1, 10**6)), np.int64)

    for specs in layout(kind).values():
        for spec in specs:
            if isinstance(spec, InvertedResidualSpec):
                p, h = f"{spec.prefix}.conv", spec.hidden
                conv(f"{p}.0.weight", (h, spec.inp, 1, 1), after_relu=False)
                bn(f"{p}.1", h)
                conv(f"{p}.3.weight", (h, 1, 3, 3))
                bn(f"{p}.4", h)
                conv(f"{p}.6.weight", (spec.oup, h, 1, 1))
                bn(f"{p}.7", spec.oup, 0.35 if spec.residual else 1.0)
            elif isinstance(spec, ConvBNSpec):
                # The UNet's audio convs follow inverted residuals (no ReLU); the audio
                # encoder's blocks follow ReLUs, except the first one (the mel).
                after_relu = spec.conv.startswith("audio_encoder.") and spec.inp != 1
                shape = (spec.oup, spec.inp, spec.kernel, spec.kernel)
                conv(f"{spec.conv}.weight", shape, after_relu)
                bias(f"{spec.conv}.bias", spec.oup)
                bn(spec.bn, spec.oup, 0.35 if spec.residual else 1.0)
            else:
                shape = (spec.oup, spec.inp, spec.kernel, spec.kernel)
                conv(f"{spec.prefix}.weight", shape, after_relu=False)
                bias(f"{spec.prefix}.bias", spec.oup)
    # Same keys, same order as the reference table.
    expected = expected_state_dict_shapes(kind)
    return {k: sd[k] for k in expected}


# --------------------------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------------------------


class _Graph:
    """Emits ONNX nodes and float32 initializers; BN is folded into the preceding conv."""

    def __init__(self, state_dict: Mapping[str, np.ndarray]):
        self.sd = state_dict
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def reserve(self, *names: str) -> None:
        self._names.update(names)

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def _array(self, key: str) -> np.ndarray:
        return np.asarray(self.sd[key], dtype=np.float64)

    def _folded(
        self, weight_key: str, bias_key: str | None, bn_prefix: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        w = self._array(weight_key)
        b = self._array(bias_key) if bias_key else np.zeros(w.shape[0])
        if bn_prefix is not None:
            gamma = self._array(f"{bn_prefix}.weight")
            beta = self._array(f"{bn_prefix}.bias")
            mean = self._array(f"{bn_prefix}.running_mean")
            var = self._array(f"{bn_prefix}.running_var")
            scale = gamma / np.sqrt(var + BN_EPS)
            w = w * scale[:, None, None, None]
            b = (b - mean) * scale + beta
        return w.astype(np.float32), b.astype(np.float32)

    def node(
        self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs: object
    ) -> str:
        """Append a node; its output is named after the node unless `output` is given."""
        name = self._unique(name)
        out = output or name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(
        self,
        x: str,
        name: str,
        weight_key: str,
        bias_key: str | None,
        bn_prefix: str | None,
        stride: tuple[int, int] = (1, 1),
        padding: int = 0,
        group: int = 1,
    ) -> str:
        w, b = self._folded(weight_key, bias_key, bn_prefix)
        kh, kw = w.shape[2:]
        inputs = [x, self.constant(f"{name}.weight", w), self.constant(f"{name}.bias", b)]
        return self.node(
            "Conv",
            inputs,
            name,
            kernel_shape=[int(kh), int(kw)],
            strides=list(stride),
            pads=[padding] * 4,
            group=group,
        )

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def inverted_residual(self, x: str, s: InvertedResidualSpec) -> str:
        p = f"{s.prefix}.conv"
        y = self.conv(x, f"{p}.0", f"{p}.0.weight", None, f"{p}.1")
        y = self.relu(y, f"{p}.2")
        y = self.conv(
            y, f"{p}.3", f"{p}.3.weight", None, f"{p}.4", (s.stride, s.stride), 1, s.hidden
        )
        y = self.relu(y, f"{p}.5")
        y = self.conv(y, f"{p}.6", f"{p}.6.weight", None, f"{p}.7")
        if s.residual:
            y = self.node("Add", [x, y], f"{s.prefix}.add")
        return y

    def conv_bn(self, x: str, s: ConvBNSpec) -> str:
        y = self.conv(x, s.conv, f"{s.conv}.weight", f"{s.conv}.bias", s.bn, s.stride, s.padding)
        if s.residual:
            y = self.node("Add", [y, x], f"{s.conv}.add")
        if s.relu:
            y = self.relu(y, f"{s.conv}.relu")
        return y

    def chain(self, x: str, specs: list[Spec]) -> str:
        for s in specs:
            if isinstance(s, InvertedResidualSpec):
                x = self.inverted_residual(x, s)
            elif isinstance(s, ConvBNSpec):
                x = self.conv_bn(x, s)
            else:
                x = self.conv(x, s.prefix, f"{s.prefix}.weight", f"{s.prefix}.bias", None)
        return x


def _tensor_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH_DIM, *shape])


def _unet_graph(g: _Graph) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    L = unet_layout()
    skips = [g.chain(UNET_INPUT, L["inc"])]  # x1 (32 @ 320)
    for i in range(1, 6):  # x2 .. x6 (32 @ 160 ... 512 @ 10)
        skips.append(g.chain(skips[-1], L[f"down{i}"]))
    audio = g.chain(UNET_AUDIO, L["audio_model"])  # 512 @ 10
    x = g.node("Concat", [skips[-1], audio], "cat_audio", axis=1)
    x = g.chain(x, L["fuse_conv"])  # 256 @ 10
    scales = g.constant("up_scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    for i in range(1, 6):
        up = g.node(
            "Resize",
            [x, "", scales],
            f"up{i}.up",
            mode="linear",
            coordinate_transformation_mode="align_corners",
        )
        cat = g.node("Concat", [up, skips[-1 - i]], f"up{i}.cat", axis=1)
        x = g.chain(cat, L[f"up{i}"])
    logits = g.chain(x, L["outc"])
    g.node("Sigmoid", [logits], "sigmoid", output=UNET_OUTPUT)
    inputs = [
        _tensor_info(UNET_INPUT, UNET_INPUT_SHAPE),
        _tensor_info(UNET_AUDIO, UNET_AUDIO_SHAPE),
    ]
    return inputs, [_tensor_info(UNET_OUTPUT, UNET_OUTPUT_SHAPE)]


def _audio_encoder_graph(
    g: _Graph,
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    x = g.chain(AUDIO_ENCODER_INPUT, audio_encoder_layout()["audio_encoder"])  # [B, 512, 1, 1]
    g.node("Flatten", [x], "flatten", output=AUDIO_ENCODER_OUTPUT, axis=1)
    inputs = [_tensor_info(AUDIO_ENCODER_INPUT, AUDIO_ENCODER_INPUT_SHAPE)]
    return inputs, [_tensor_info(AUDIO_ENCODER_OUTPUT, AUDIO_ENCODER_OUTPUT_SHAPE)]


def build_model(
    state_dict: Mapping[str, np.ndarray], kind: str, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """The ONNX model of network `kind` with the weights of `state_dict` (reference keys;
    for the audio encoder with the ``audio_encoder.`` prefix). Raises StateDictError when
    the keys or shapes differ from the reference table."""
    if opset < 13:
        raise ValueError("opset 13 or newer is needed")
    check_state_dict(state_dict, kind)
    g = _Graph(state_dict)
    g.reserve(UNET_INPUT, UNET_AUDIO, UNET_OUTPUT, AUDIO_ENCODER_INPUT, AUDIO_ENCODER_OUTPUT)
    if kind == KIND_UNET:
        inputs, outputs = _unet_graph(g)
        doc = "SyncTalk_2D UNet 328 (ave): input [B,6,320,320] + audio [B,32,16,16] -> output"
    else:
        inputs, outputs = _audio_encoder_graph(g)
        doc = "SyncTalk_2D audio encoder (ave): mel [B,1,80,16] -> features [B,512]"
    graph = helper.make_graph(
        g.nodes, f"synctalk2d_{kind}", inputs, outputs, initializer=g.initializers
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="lipsync.avatars.nets.onnx_builder",
        doc_string=doc,
    )
    helper.set_model_props(model, {"lipsync.network": f"synctalk2d-{kind}"})
    return model


def build_unet(state_dict: Mapping[str, np.ndarray], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    return build_model(state_dict, KIND_UNET, opset)


def build_audio_encoder(
    state_dict: Mapping[str, np.ndarray], opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    return build_model(state_dict, KIND_AUDIO_ENCODER, opset)


def build_reference_unet(seed: int = 0) -> onnx.ModelProto:
    """The reference-size UNet with random weights (for benchmarks and tests)."""
    return build_unet(random_reference_state_dict(KIND_UNET, seed))


def build_reference_audio_encoder(seed: int = 0) -> onnx.ModelProto:
    """The reference audio encoder with random weights (for benchmarks and tests)."""
    return build_audio_encoder(random_reference_state_dict(KIND_AUDIO_ENCODER, seed))


def save_model(model: onnx.ModelProto, path: Path | str) -> Path:
    """Write `model` to `path` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
