"""Model registry: which avatars' networks are in memory.

Loads lazily on first use, or explicitly (LoadModel, the preload list); keeps at most
`max_models` models and `max_bytes` bytes, evicting by LRU or LFU; unloads models
idle for longer than `idle_unload_s`. Loading of one model never blocks requests for
models already loaded, and concurrent first requests load a model once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Sized(Protocol):
    nbytes: int


M = TypeVar("M", bound=Sized)


class CapacityError(RuntimeError):
    """A model cannot fit in the registry's capacity even when it is empty."""


@dataclass
class Entry(Generic[M]):
    model: M
    load_ms: float
    loaded_at: float
    last_used: float
    uses: int = 0


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


class ModelRegistry(Generic[M]):
    def __init__(
        self,
        loader: Callable[[str], M],
        max_models: int,
        max_bytes: int,
        eviction: str = "lru",
        idle_unload_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if eviction not in ("lru", "lfu"):
            raise ValueError("eviction must be 'lru' or 'lfu'")
        self._loader = loader
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.idle_unload_s = idle_unload_s
        self._clock = clock
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._entries: dict[str, Entry[M]] = {}
        self._usage: dict[str, UsageStats] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- lookups -------------------------------------------------------------
    def get(self, model_id: str) -> M:
        """The loaded model, loading it first if needed; counts one use."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                entry.last_used = self._clock()
                entry.uses += 1
                return entry.model
        entry, _ = self._load(model_id)
        with self._lock:
            entry.last_used = self._clock()
            entry.uses += 1
        return entry.model

    def load(self, model_id: str) -> float:
        """Load (if not loaded) and return the load time in ms (0 if it was loaded)."""
        _, load_ms = self._load(model_id)
        return load_ms

    def unload(self, model_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(model_id, None)
        if entry is not None:
            log.info("unloaded model %s", model_id)
        return entry is not None

    def is_loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._entries

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def record(self, model_id: str, frames: int, ms: float) -> None:
        with self._lock:
            u = self._usage.setdefault(model_id, UsageStats())
            u.requests += 1
            u.frames += frames
            u.total_ms += ms
            u.last_used = time.time()

    def snapshot(self) -> RegistrySnapshot:
        with self._lock:
            loaded = dict(self._entries)
            return RegistrySnapshot(
                loaded=loaded,
                usage={k: UsageStats(**vars(v)) for k, v in self._usage.items()},
                loaded_bytes=sum(e.model.nbytes for e in loaded.values()),
            )

    # -- loading and eviction --------------------------------------------------
    def _load(self, model_id: str) -> tuple[Entry[M], float]:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                return entry, 0.0
            gate = self._loading.setdefault(model_id, threading.Lock())
        with gate:
            with self._lock:
                entry = self._entries.get(model_id)
                if entry is not None:
                    return entry, 0.0
            t0 = time.perf_counter()
            model = self._loader(model_id)  # raises for unknown/broken models
            load_ms = (time.perf_counter() - t0) * 1000.0
            if model.nbytes > self.max_bytes:
                raise CapacityError(
                    f"model {model_id!r} needs {model.nbytes} bytes, more than the registry's "
                    f"max_bytes ({self.max_bytes})"
                )
            now = self._clock()
            entry = Entry(model=model, load_ms=load_ms, loaded_at=now, last_used=now)
            with self._lock:
                self._make_room(model.nbytes)
                self._entries[model_id] = entry
                u = self._usage.setdefault(model_id, UsageStats())
                u.load_ms = load_ms
                u.loads += 1
                self._loading.pop(model_id, None)
            log.info("loaded model %s in %.0f ms (%d bytes)", model_id, load_ms, model.nbytes)
            return entry, load_ms

    def _victim(self) -> str:
        if self.eviction == "lfu":
            return min(
                self._entries, key=lambda k: (self._entries[k].uses, self._entries[k].last_used)
            )
        return min(self._entries, key=lambda k: self._entries[k].last_used)

    def _make_room(self, incoming_bytes: int) -> None:
        """Evict until one more model of `incoming_bytes` fits. Caller holds the lock."""
        while self._entries and (
            len(self._entries) + 1 > self.max_models
            or sum(e.model.nbytes for e in self._entries.values()) + incoming_bytes > self.max_bytes
        ):
            victim = self._victim()
            del self._entries[victim]
            log.info("evicted model %s (%s)", victim, self.eviction)

    def unload_idle(self) -> list[str]:
        """Unload models unused for longer than idle_unload_s; returns their ids."""
        if self.idle_unload_s <= 0:
            return []
        now = self._clock()
        with self._lock:
            idle = [k for k, e in self._entries.items() if now - e.last_used > self.idle_unload_s]
            for k in idle:
                del self._entries[k]
        for k in idle:
            log.info("unloaded idle model %s", k)
        return idle

    def start_idle_reaper(self, interval_s: float | None = None) -> None:
        if self.idle_unload_s <= 0 or self._reaper is not None:
            return
        interval = interval_s or max(0.5, min(30.0, self.idle_unload_s / 4))

        def run() -> None:
            while not self._stop.wait(interval):
                self.unload_idle()

        self._reaper = threading.Thread(target=run, name="registry-idle-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._entries.clear()
