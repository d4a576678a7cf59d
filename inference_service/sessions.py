"""ONNX Runtime sessions: execution-provider choice with a clean CPU fallback, tuning,
and binding a network's inputs by shape rather than by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lipsync.config import InferenceConfig

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

_warned: set[str] = set()


def resolve_providers(requested: list[str], device_id: int = 0) -> list[str | tuple[str, dict]]:
    """Map config names to the providers this onnxruntime build has, in order.

    Unavailable ones are dropped with one log line each; CPU is always last.
    """
    available = ort.get_available_providers()
    out: list[str | tuple[str, dict]] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            if full not in _warned:
                _warned.add(full)
                log.warning(
                    "execution provider %s is not available in this onnxruntime build "
                    "(it has %s); falling back to the next one",
                    full,
                    ", ".join(available),
                )
            continue
        if full in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            out.append((full, {"device_id": device_id}))
        elif full not in [p if isinstance(p, str) else p[0] for p in out]:
            out.append(full)
    if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in out]:
        out.append("CPUExecutionProvider")
    return out


@dataclass(frozen=True)
class SessionOptions:
    providers: tuple[str, ...] = ("cuda", "cpu")
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    # Convert to float16 (inputs/outputs stay float32) when running on CUDA.
    cuda_fp16: bool = True
    allow_spinning: bool = False

    @staticmethod
    def from_config(icfg: InferenceConfig) -> SessionOptions:
        return SessionOptions(
            providers=tuple(icfg.execution_providers),
            device_id=icfg.device_id,
            intra_op_threads=icfg.intra_op_threads,
            inter_op_threads=icfg.inter_op_threads,
            cuda_fp16=icfg.cuda_fp16,
            allow_spinning=icfg.allow_spinning,
        )


def to_float16(model_path: Path) -> bytes:
    """The model with float16 weights and compute, keeping float32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(model_path))
    # Resize's scales/roi and Sigmoid stay valid in fp16; keep_io_types adds the casts.
    return convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def create_session(
    path: Path | str | bytes, opts: SessionOptions, fp16_ok: bool = False
) -> ort.InferenceSession:
    """An inference session on the first provider that works, logging what it runs on.

    With `fp16_ok` and `opts.cuda_fp16`, a model about to run on CUDA is converted to
    float16 first; on the CPU it stays float32 (float16 convolutions are slow there), also
    when a GPU provider was asked for but could not be initialised.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if opts.intra_op_threads:
        so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = max(1, opts.inter_op_threads)
    so.log_severity_level = 3
    if not opts.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = resolve_providers(list(opts.providers), opts.device_id)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    where = path if not isinstance(path, bytes) else "model"
    model = str(path) if isinstance(path, Path) else path
    half = (
        fp16_ok and opts.cuda_fp16 and wanted != "CPUExecutionProvider" and isinstance(path, Path)
    )
    if half:
        log.info("converting %s to float16 for %s", path, wanted)
        model = to_float16(path)  # type: ignore[arg-type]
    sess = ort.InferenceSession(model, sess_options=so, providers=providers)
    got = sess.get_providers()
    if wanted not in got:
        log.warning(
            "%s could not be initialised (no usable GPU?); %s runs on %s", wanted, where, got[0]
        )
        if half and got[0] == "CPUExecutionProvider":
            log.warning("%s: running the float32 model on the CPU instead of float16", where)
            sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    return sess


def main_provider(sess: ort.InferenceSession) -> str:
    return sess.get_providers()[0]


class NetworkSignatureError(ValueError):
    """A model's inputs/outputs do not match the contract it is used for."""


@dataclass(frozen=True)
class UNetBinding:
    """Names of a UNet's inputs and output, found by shape: visual [B,6,H,W], audio [B,32,16,16]."""

    visual: str
    audio: str
    output: str

    @staticmethod
    def of(sess: ort.InferenceSession, where: str = "unet") -> UNetBinding:
        inputs = sess.get_inputs()
        if len(inputs) != 2 or len(sess.get_outputs()) < 1:
            raise NetworkSignatureError(
                f"{where}: expected 2 inputs (visual, audio) and 1 output, got "
                f"{len(inputs)} inputs and {len(sess.get_outputs())} outputs"
            )
        visual = audio = None
        for inp in inputs:
            shape = inp.shape
            ch = shape[1] if len(shape) == 4 else None
            if ch == 6:
                visual = inp.name
            elif ch == 32:
                audio = inp.name
        if visual is None or audio is None or visual == audio:
            # Shapes are symbolic or unusual: bind by position (visual first), as exported.
            visual, audio = inputs[0].name, inputs[1].name
        return UNetBinding(visual, audio, sess.get_outputs()[0].name)


@dataclass(frozen=True)
class EncoderBinding:
    input: str
    output: str

    @staticmethod
    def of(sess: ort.InferenceSession, where: str = "audio encoder") -> EncoderBinding:
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise NetworkSignatureError(f"{where}: expected 1 input [B,1,80,16] and 1 output")
        return EncoderBinding(inputs[0].name, outputs[0].name)


def check_unet(sess: ort.InferenceSession, binding: UNetBinding, where: str) -> None:
    """Run one frame of zeros and check the output is [1,3,320,320]."""
    out = sess.run(
        [binding.output],
        {
            binding.visual: np.zeros((1, 6, 320, 320), np.float32),
            binding.audio: np.zeros((1, 32, 16, 16), np.float32),
        },
    )[0]
    if out.shape != (1, 3, 320, 320):
        raise NetworkSignatureError(f"{where}: output shape {out.shape}, expected [B,3,320,320]")


def check_encoder(sess: ort.InferenceSession, binding: EncoderBinding, where: str) -> None:
    out = sess.run([binding.output], {binding.input: np.zeros((1, 1, 80, 16), np.float32)})[0]
    if out.shape != (1, 512):
        raise NetworkSignatureError(f"{where}: output shape {out.shape}, expected [B,512]")
