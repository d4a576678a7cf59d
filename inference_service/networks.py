"""An avatar's networks in memory: the UNet and the audio encoder it uses, each behind
a dynamic batcher (or, with batching off, run one request at a time)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference_service.batching import DynamicBatcher
from inference_service.sessions import (
    EncoderBinding,
    SessionOptions,
    UNetBinding,
    check_encoder,
    check_unet,
    create_session,
    main_provider,
)
from lipsync.avatars.quantize.check import QualityBounds, check_int8_unet
from lipsync.core.tensors import AUDIO_ENCODER_INPUT_SHAPE, UNET_AUDIO_SHAPE, UNET_INPUT_SHAPE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    enabled: bool = True
    max_batch: int = 32  # UNet frames per run on a GPU
    max_wait_s: float = 0.002
    cpu_max_batch: int = 1  # ... when the UNet runs on the CPU

    def for_provider(self, provider: str) -> BatchPolicy:
        """The policy for a network running on `provider`."""
        if provider == "CPUExecutionProvider":
            return BatchPolicy(
                self.enabled, self.cpu_max_batch, self.max_wait_s, self.cpu_max_batch
            )
        return self


class _Runner:
    """Calls `run(*arrays)` in runs of at most max_batch rows: batched across concurrent
    callers by a DynamicBatcher, or serialised by a lock when batching is off."""

    def __init__(self, run, policy: BatchPolicy, name: str):  # type: ignore[no-untyped-def]
        self._run = run
        self.policy = policy
        self._lock = threading.Lock()
        self.batcher = (
            DynamicBatcher(run, policy.max_batch, policy.max_wait_s, name)
            if policy.enabled
            else None
        )

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            return self.batcher(*arrays)
        n, step = len(arrays[0]), self.policy.max_batch
        with self._lock:
            parts = [self._run(*(a[i : i + step] for a in arrays)) for i in range(0, n, step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class AudioEncoder:
    """[n, 1, 80, 16] mel windows -> [n, 512] features.

    Consecutive requests of a clip (batches stepping through it, or a stream's tails)
    share the context windows around their frames, so encoded rows are kept in an LRU
    cache keyed by the window's bytes: each window is encoded once. The encoder is small;
    its session runs on one thread so it never competes with the UNet for every core.
    """

    CACHE_ROWS = 8192  # 16 MiB of features

    def __init__(self, path: Path, opts: SessionOptions, policy: BatchPolicy):
        self.path = path
        self.session = create_session(path, dataclasses.replace(opts, intra_op_threads=1))
        self.binding = EncoderBinding.of(self.session, str(path))
        check_encoder(self.session, self.binding, str(path))
        self.nbytes = path.stat().st_size
        self.provider = main_provider(self.session)
        # The encoder is small: let runs grow larger than the UNet's.
        enc_policy = BatchPolicy(policy.enabled, max(256, policy.max_batch), policy.max_wait_s)
        self._runner = _Runner(self._run, enc_policy, f"encoder:{path.parent.name}")
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.hits = self.misses = 0

    def _run(self, windows: np.ndarray) -> np.ndarray:
        b = self.binding
        return self.session.run([b.output], {b.input: np.ascontiguousarray(windows)})[0]

    def encode(self, windows: np.ndarray) -> np.ndarray:
        keys = [hashlib.blake2b(w.tobytes(), digest_size=16).digest() for w in windows]
        out = np.empty((len(windows), 512), np.float32)
        missing = []
        with self._cache_lock:
            for i, key in enumerate(keys):
                row = self._cache.get(key)
                if row is None:
                    missing.append(i)
                else:
                    out[i] = row
                    self._cache.move_to_end(key)
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
        if missing:
            out[missing] = self._runner(windows[missing])
            with self._cache_lock:
                for i in missing:
                    self._cache[keys[i]] = out[i].copy()
                while len(self._cache) > self.CACHE_ROWS:
                    self._cache.popitem(last=False)
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
    runner: _Runner
    # Memory the load added, measured (inference_service/memory.py): GetModelStats.
    memory_bytes: int = 0
    precision: str = "float32"  # of the UNet served: float32 | float16 | int8
    precision_note: str = ""  # why not the precision asked for, or the int8 check's result

    def _run(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        b = self.unet_binding
        return self.unet.run(
            [b.output],
            {b.visual: np.ascontiguousarray(visual), b.audio: np.ascontiguousarray(audio)},
        )[0]

    def run_unet(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """[B,6,320,320] + [B,32,16,16] -> [B,3,320,320], batched with concurrent callers."""
        return self.runner(visual, audio)

    def warm_up(self) -> None:
        """One frame of zeros through both networks, straight through the sessions (no
        batcher, no encoder cache), when the model loads: a session's first run allocates
        its arenas and, on CUDA, picks its kernels, so the first real call would pay for
        it (24 ms for the demo avatar on this CPU; much more on a GPU)."""
        self._run(
            np.zeros((1, *UNET_INPUT_SHAPE), np.float32),
            np.zeros((1, *UNET_AUDIO_SHAPE), np.float32),
        )
        self.encoder._run(np.zeros((1, *AUDIO_ENCODER_INPUT_SHAPE), np.float32))


@dataclass(frozen=True)
class CpuPrecision:
    """Which UNet the CPU provider serves for an avatar: "float32", or "int8" from
    `int8_path` when it passes its check against `bounds` (lipsync.avatars.quantize.check)."""

    precision: str = "float32"
    int8_path: Path | None = None
    bounds: QualityBounds = field(default_factory=QualityBounds)


def _unet_run(sess: ort.InferenceSession, b: UNetBinding):  # type: ignore[no-untyped-def]
    def run(visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        return sess.run([b.output], {b.visual: visual, b.audio: audio})[0]

    return run


def _int8_unet(
    float_path: Path,
    float_session: ort.InferenceSession,
    float_binding: UNetBinding,
    choice: CpuPrecision,
    opts: SessionOptions,
) -> tuple[ort.InferenceSession, UNetBinding, str]:
    """The int8 UNet's session, binding and check summary; Int8RefusedError (or any error
    loading it) when it is not to be served."""
    assert choice.int8_path is not None
    made: list[tuple[ort.InferenceSession, UNetBinding]] = []

    def make_run():  # type: ignore[no-untyped-def]
        sess = create_session(choice.int8_path, dataclasses.replace(opts, providers=("cpu",)))
        binding = UNetBinding.of(sess, str(choice.int8_path))
        check_unet(sess, binding, str(choice.int8_path))
        made.append((sess, binding))
        return _unet_run(sess, binding)

    _, result, _ = check_int8_unet(
        float_path,
        choice.int8_path,
        _unet_run(float_session, float_binding),
        make_run,
        choice.bounds,
    )
    sess, binding = made[0]
    return sess, binding, result.describe()


def load_networks(
    model_id: str,
    unet_path: Path,
    encoder_path: Path | None,
    shared_encoder: AudioEncoder | None,
    opts: SessionOptions,
    policy: BatchPolicy,
    cpu: CpuPrecision | None = None,
) -> AvatarNetworks:
    cpu = cpu or CpuPrecision()
    unet = create_session(unet_path, opts, fp16_ok=True)
    binding = UNetBinding.of(unet, str(unet_path))
    check_unet(unet, binding, str(unet_path))
    provider = main_provider(unet)
    on_cpu = provider == "CPUExecutionProvider"
    precision = "float32" if on_cpu or not opts.cuda_fp16 else "float16"
    note = ""
    if cpu.precision == "int8":
        if not on_cpu:
            note = f"int8 applies to the CPU provider; {provider} serves {precision}"
        elif cpu.int8_path is None:
            note = "int8 asked for, but the package has no int8 UNet (lipsync-avatar quantize)"
            log.info("%s: %s; serving float32", model_id, note)
        else:
            try:
                unet, binding, note = _int8_unet(unet_path, unet, binding, cpu, opts)
                precision = "int8"
                log.info("%s: serving the int8 UNet %s (%s)", model_id, cpu.int8_path, note)
            except Exception as exc:  # an optional faster model: any failure keeps float32
                note = f"int8 UNet refused: {' '.join(str(exc).split())[:500]}"
                log.warning(
                    "%s: %s refused, serving the float32 UNet instead: %s",
                    model_id,
                    cpu.int8_path,
                    note,
                )
    unet_file = cpu.int8_path if precision == "int8" and cpu.int8_path else unet_path
    if encoder_path is not None:
        encoder, own = AudioEncoder(encoder_path, opts, policy), True
    elif shared_encoder is not None:
        encoder, own = shared_encoder, False
    else:
        raise FileNotFoundError(
            f"model {model_id!r} has no audio_encoder.onnx and no shared audio encoder is "
            "configured (inference.shared_audio_encoder)"
        )
    nets = AvatarNetworks(
        model_id=model_id,
        unet=unet,
        unet_binding=binding,
        encoder=encoder,
        own_encoder=own,
        nbytes=unet_file.stat().st_size + (encoder.nbytes if own else 0),
        provider=main_provider(unet),
        runner=None,  # type: ignore[arg-type]
        precision=precision,
        precision_note=note,
    )
    nets.runner = _Runner(nets._run, policy.for_provider(nets.provider), f"unet:{model_id}")
    return nets
