"""Synthetic signals for benchmarks and tests (no speech data needed)."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like audio: voiced harmonics (pitch 90-150 Hz) with a syllable-rate envelope
    and a little noise; float32 mono at `sr`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 3.1 * t) + 0.3, 0, None)
    sig = 0.25 * env * voiced + 0.02 * rng.standard_normal(len(t))
    return sig.astype(np.float32)
