"""The SyncTalk_2D reference networks.

- `lipsync.avatars.nets.onnx_builder`: the layout, random weights and a torch-free ONNX builder
  (needs `numpy` and `onnx`).
- `lipsync.avatars.nets.torch_nets`: the same networks as PyTorch modules (needs `torch`, the
  `convert` extra); only this module imports torch.

Nothing is imported eagerly; the builder's public names are also reachable here lazily,
e.g. ``from lipsync.avatars.nets import build_reference_unet``.
"""

from __future__ import annotations

import importlib
from typing import Any

_BUILDER_NAMES = {
    "KIND_AUDIO_ENCODER",
    "KIND_UNET",
    "StateDictError",
    "build_audio_encoder",
    "build_model",
    "build_reference_audio_encoder",
    "build_reference_unet",
    "build_unet",
    "check_state_dict",
    "expected_state_dict_shapes",
    "parameter_count",
    "random_reference_state_dict",
    "save_model",
}

__all__ = sorted(_BUILDER_NAMES)


def __getattr__(name: str) -> Any:
    if name in _BUILDER_NAMES:
        return getattr(importlib.import_module("lipsync.avatars.nets.onnx_builder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
