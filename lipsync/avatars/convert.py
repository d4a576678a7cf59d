"""Convert SyncTalk_2D PyTorch checkpoints to the ONNX models of an avatar package.

`convert_checkpoints` reads the UNet checkpoint (``<epoch>.pth``, a plain state dict) and
optionally the shared audio encoder checkpoint (``audio_visual_encoder.pth``, keys stored
without the ``audio_encoder.`` prefix), checks them strictly against the reference tables,
builds the ONNX graphs with `lipsync.avatars.nets.onnx_builder` (BatchNorm folded) and verifies
that ONNX Runtime reproduces the PyTorch modules within 1e-4 before writing
``unet.onnx`` / ``audio_encoder.onnx``.

torch is needed to read ``.pth`` files and to verify (``pip install -e '.[convert]'``);
ONNX Runtime only to verify.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipsync.avatars.nets import onnx_builder as ob
from lipsync.avatars.package import AUDIO_ENCODER_FILE, UNET_FILE

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
VERIFY_BATCH = 2
AUDIO_ENCODER_PREFIX = "audio_encoder."
_WRAPPER_KEYS = ("state_dict", "model")


class ConvertError(Exception):
    """Base of the errors a conversion reports to its user (no traceback needed)."""


class CheckpointError(ConvertError, ValueError):
    """A checkpoint cannot be read or does not match the reference network."""


class VerificationError(ConvertError, RuntimeError):
    """ONNX Runtime and PyTorch disagree on the converted network."""


class MissingDependencyError(ConvertError, ImportError):
    """torch (or onnxruntime, for verification) is not installed."""


@dataclass
class ConvertReport:
    """What `convert_checkpoints` wrote and how well it matched PyTorch."""

    unet_path: Path
    audio_encoder_path: Path | None
    verified: bool
    unet_max_abs_diff: float | None = None
    audio_encoder_max_abs_diff: float | None = None
    tolerance: float = TOLERANCE
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def max_abs_diffs(self) -> dict[str, float]:
        out = {}
        if self.unet_max_abs_diff is not None:
            out["unet"] = self.unet_max_abs_diff
        if self.audio_encoder_max_abs_diff is not None:
            out["audio_encoder"] = self.audio_encoder_max_abs_diff
        return out


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            "PyTorch is needed to read .pth checkpoints and to verify the conversion: "
            "pip install -e '.[convert]' (or pip install torch)"
        ) from exc
    return torch


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "onnxruntime is needed to verify the conversion: pip install -e '.[cpu]' "
            "(or pass --no-verify / verify=False)"
        ) from exc
    return onnxruntime


def resolve_unet_checkpoint(path: Path) -> Path:
    """`path` itself if it is a file; for a folder (``checkpoint/<name>/``) the
    ``<epoch>.pth`` with the highest epoch, as the reference inference picks it."""
    path = Path(path)
    if path.is_dir():
        epochs = [(int(p.stem), p) for p in path.glob("*.pth") if re.fullmatch(r"\d+", p.stem)]
        if not epochs:
            raise CheckpointError(f"{path}: no <epoch>.pth checkpoint in this folder")
        return max(epochs)[1]
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def _one_line(exc: BaseException) -> str:
    """The telling line of a (multi-line) torch.load error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Unpickler error" in ln or "Unsupported global" in ln:
            return ln
    return lines[0] if lines else type(exc).__name__


def _is_tensor_dict(obj: Any, torch: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_state_dict(path: Path | str, what: str = "checkpoint") -> dict[str, Any]:
    """Read a ``.pth`` state dict (``weights_only=True``) as ``{key: torch.Tensor}``.

    A plain state dict is taken as is. A dict wrapping one under ``'state_dict'`` or
    ``'model'`` is unwrapped when exactly one of those holds a state dict; anything else is
    refused with a CheckpointError.
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"{what} {path}: cannot be read as a PyTorch checkpoint: {_one_line(exc)}"
        ) from exc
    if _is_tensor_dict(obj, torch):
        return dict(obj)
    if isinstance(obj, Mapping):
        wrapped = [k for k in _WRAPPER_KEYS if _is_tensor_dict(obj.get(k), torch)]
        if len(wrapped) == 1:
            log.info("%s %s: using the state dict under %r", what, path, wrapped[0])
            return dict(obj[wrapped[0]])
        if len(wrapped) > 1:
            raise CheckpointError(
                f"{what} {path}: ambiguous, both 'state_dict' and 'model' hold state dicts"
            )
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise CheckpointError(
            f"{what} {path}: not a state dict (a dict of tensors) and no 'state_dict' or "
            f"'model' entry holding one; top-level keys: {keys or 'none'}"
        )
    raise CheckpointError(f"{what} {path}: expected a state dict, found {type(obj).__name__}")


def add_audio_encoder_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The reference adds ``audio_encoder.`` to the keys of the shared checkpoint; keys
    that already all carry it are kept."""
    if all(k.startswith(AUDIO_ENCODER_PREFIX) for k in state_dict):
        return dict(state_dict)
    return {AUDIO_ENCODER_PREFIX + k: v for k, v in state_dict.items()}


def _to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state_dict.items():
        t = v.detach().cpu()
        out[k] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def _checked_arrays(
    state_dict: Mapping[str, Any], kind: str, path: Path, what: str
) -> dict[str, np.ndarray]:
    """The state dict as float32/int64 arrays, after a strict check of keys and shapes."""
    arrays = _to_numpy(state_dict)
    try:
        ob.check_state_dict(arrays, kind)
    except ob.StateDictError as exc:
        hint = ""
        if arrays and all(k.startswith("module.") for k in arrays):
            hint = " (every key starts with 'module.': saved from a DataParallel wrapper?)"
        raise CheckpointError(f"{what} {path}: {exc}{hint}") from None
    return arrays


def _verify(kind: str, state_dict: Mapping[str, Any], onnx_bytes: bytes, seed: int) -> float:
    torch = _import_torch()
    ort = _import_ort()
    from lipsync.avatars.nets import torch_nets

    module = torch_nets.ReferenceUNet() if kind == ob.KIND_UNET else torch_nets.AudioEncoder()
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"PyTorch refused the {kind} state dict: {exc}") from None
    module.eval()
    rng = np.random.default_rng(seed)
    if kind == ob.KIND_UNET:
        feeds = {
            ob.UNET_INPUT: rng.uniform(0, 1, (VERIFY_BATCH, *ob.UNET_INPUT_SHAPE)),
            ob.UNET_AUDIO: rng.normal(0, 1, (VERIFY_BATCH, *ob.UNET_AUDIO_SHAPE)),
        }
    else:
        feeds = {
            ob.AUDIO_ENCODER_INPUT: rng.uniform(
                -4, 4, (VERIFY_BATCH, *ob.AUDIO_ENCODER_INPUT_SHAPE)
            )
        }
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, feeds)
    if got.shape != expected.shape:
        raise VerificationError(
            f"{kind}: ONNX output shape {got.shape} differs from PyTorch's {expected.shape}"
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not np.isfinite(diff):
        raise VerificationError(f"{kind}: non-finite outputs (ONNX or PyTorch)")
    return diff


def _convert_one(
    kind: str,
    state_dict: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    out_path: Path,
    verify: bool,
    tolerance: float,
    seed: int,
) -> float | None:
    model = ob.build_model(arrays, kind)
    diff = None
    if verify:
        diff = _verify(kind, state_dict, model.SerializeToString(), seed)
        if diff > tolerance:
            raise VerificationError(
                f"{kind}: ONNX Runtime differs from PyTorch by {diff:.3g} (max abs), more "
                f"than the tolerance {tolerance:g}; nothing written to {out_path}"
            )
    ob.save_model(model, out_path)
    return diff


def convert_checkpoints(
    unet_ckpt: Path,
    audio_encoder_ckpt: Path | None,
    out_dir: Path,
    verify: bool = True,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ConvertReport:
    """Convert the UNet (and the audio encoder) checkpoints to ``out_dir/unet.onnx`` (and
    ``out_dir/audio_encoder.onnx``).

    `unet_ckpt` may also be a ``checkpoint/<name>/`` folder (highest ``<epoch>.pth`` wins).
    Raises CheckpointError for unreadable or mismatching checkpoints (before writing
    anything), VerificationError when ONNX Runtime and PyTorch differ by more than
    `tolerance` on random inputs (batch 2), MissingDependencyError without torch.
    """
    t0 = time.perf_counter()
    unet_path = resolve_unet_checkpoint(Path(unet_ckpt))
    # Read and check everything before the first (slow) build, so errors come fast.
    what = "UNet checkpoint"
    unet_sd = load_state_dict(unet_path, what)
    unet_arrays = _checked_arrays(unet_sd, ob.KIND_UNET, unet_path, what)
    enc_sd = enc_arrays = None
    if audio_encoder_ckpt is not None:
        enc_path, what = Path(audio_encoder_ckpt), "audio encoder checkpoint"
        enc_sd = add_audio_encoder_prefix(load_state_dict(enc_path, what))
        enc_arrays = _checked_arrays(enc_sd, ob.KIND_AUDIO_ENCODER, enc_path, what)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ConvertReport(
        unet_path=out_dir / UNET_FILE,
        audio_encoder_path=None,
        verified=verify,
        tolerance=tolerance,
    )
    report.unet_max_abs_diff = _convert_one(
        ob.KIND_UNET, unet_sd, unet_arrays, report.unet_path, verify, tolerance, seed
    )
    report.files.append(report.unet_path)
    if enc_sd is not None and enc_arrays is not None:
        report.audio_encoder_path = out_dir / AUDIO_ENCODER_FILE
        report.audio_encoder_max_abs_diff = _convert_one(
            ob.KIND_AUDIO_ENCODER,
            enc_sd,
            enc_arrays,
            report.audio_encoder_path,
            verify,
            tolerance,
            seed,
        )
        report.files.append(report.audio_encoder_path)
    report.seconds = time.perf_counter() - t0
    return report
