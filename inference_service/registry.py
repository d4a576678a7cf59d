"""Model registry: which avatars' networks are in memory (a `lipsync.serving.store.BoundedStore`
of loaded networks, bounded by `inference.registry` max_models / max_bytes, LRU or LFU,
idle unload), plus per-model usage counters that outlive unloads (GetModelStats)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lipsync.serving.store import BoundedStore, CapacityError, Entry, V

__all__ = ["CapacityError", "ModelRegistry", "RegistrySnapshot", "UsageStats"]


@dataclass
class UsageStats:
    """Per-model counters, kept across unloads."""

    requests: int = 0
    frames: int = 0
    total_ms: float = 0.0
    last_used: float = 0.0
    load_ms: float = 0.0
    loads: int = 0


@dataclass
class RegistrySnapshot:
    loaded: dict[str, Entry] = field(default_factory=dict)
    usage: dict[str, UsageStats] = field(default_factory=dict)
    loaded_bytes: int = 0


class ModelRegistry(BoundedStore[V]):
    def __init__(
        self,
        loader: Callable[[str], V],
        max_models: int,
        max_bytes: int,
        eviction: str = "lru",
        idle_unload_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(loader, max_models, max_bytes, eviction, idle_unload_s, clock, "model")
        self._usage: dict[str, UsageStats] = {}
        self._usage_lock = threading.Lock()

    @property
    def max_models(self) -> int:
        return self.max_items

    def _loaded(self, key: str, load_ms: float) -> None:
        with self._usage_lock:
            u = self._usage.setdefault(key, UsageStats())
            u.load_ms = load_ms
            u.loads += 1

    def record(self, model_id: str, frames: int, ms: float) -> None:
        with self._usage_lock:
            u = self._usage.setdefault(model_id, UsageStats())
            u.requests += 1
            u.frames += frames
            u.total_ms += ms
            u.last_used = time.time()

    def snapshot(self) -> RegistrySnapshot:
        loaded = self.entries()
        with self._usage_lock:
            usage = {k: UsageStats(**vars(v)) for k, v in self._usage.items()}
        return RegistrySnapshot(
            loaded=loaded,
            usage=usage,
            loaded_bytes=sum(e.value.nbytes for e in loaded.values()),
        )
