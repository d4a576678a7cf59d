"""An avatar's networks in memory: the UNet and the audio encoder it uses."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference_service.sessions import (
    EncoderBinding,
    SessionOptions,
    UNetBinding,
    check_encoder,
    check_unet,
    create_session,
    main_provider,
)

log = logging.getLogger(__name__)


class AudioEncoder:
    """[n, 1, 80, 16] mel windows -> [n, 512] features, run in chunks."""

    def __init__(self, path: Path, opts: SessionOptions, chunk: int = 128):
        self.path = path
        self.session = create_session(path, opts)
        self.binding = EncoderBinding.of(self.session, str(path))
        check_encoder(self.session, self.binding, str(path))
        self.nbytes = path.stat().st_size
        self.chunk = chunk
        self.provider = main_provider(self.session)

    def encode(self, windows: np.ndarray) -> np.ndarray:
        n = len(windows)
        out = np.empty((n, 512), np.float32)
        for i in range(0, n, self.chunk):
            out[i : i + self.chunk] = self.session.run(
                [self.binding.output], {self.binding.input: windows[i : i + self.chunk]}
            )[0]
        return out


@dataclass
class AvatarNetworks:
    model_id: str
    unet: ort.InferenceSession
    unet_binding: UNetBinding
    encoder: AudioEncoder
    own_encoder: bool
    nbytes: int
    provider: str
    # One UNet run at a time per session: ORT already uses all intra-op threads,
    # and concurrent runs only thrash the caches (dynamic batching merges them).
    run_lock: threading.Lock

    def run_unet(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        b = self.unet_binding
        with self.run_lock:
            return self.unet.run([b.output], {b.visual: visual, b.audio: audio})[0]


def load_networks(
    model_id: str,
    unet_path: Path,
    encoder_path: Path | None,
    shared_encoder: AudioEncoder | None,
    opts: SessionOptions,
) -> AvatarNetworks:
    unet = create_session(unet_path, opts)
    binding = UNetBinding.of(unet, str(unet_path))
    check_unet(unet, binding, str(unet_path))
    if encoder_path is not None:
        encoder, own = AudioEncoder(encoder_path, opts), True
    elif shared_encoder is not None:
        encoder, own = shared_encoder, False
    else:
        raise FileNotFoundError(
            f"model {model_id!r} has no audio_encoder.onnx and no shared audio encoder is "
            "configured (inference.shared_audio_encoder)"
        )
    nbytes = unet_path.stat().st_size + (encoder.nbytes if own else 0)
    return AvatarNetworks(
        model_id=model_id,
        unet=unet,
        unet_binding=binding,
        encoder=encoder,
        own_encoder=own,
        nbytes=nbytes,
        provider=main_provider(unet),
        run_lock=threading.Lock(),
    )
