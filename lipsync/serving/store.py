"""A bounded store of things loaded once: the inference service's model registry and the
compositing service's avatar frames both hold what they load here.

Loads on first use (or explicitly, or from a preload list where "*" means every known
id); concurrent first requests for an id load it once, and loading one id never blocks
lookups of others. Holds at most `max_items` items and `max_bytes` bytes (each item says
its size as `nbytes`), evicting the least recently used (`lru`) or least used (`lfu`);
items unused for longer than `idle_unload_s` can be unloaded by a reaper thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Sized(Protocol):
    nbytes: int


V = TypeVar("V", bound=Sized)


class CapacityError(RuntimeError):
    """An item cannot fit in the store's capacity even when the store is empty."""


@dataclass
class Entry(Generic[V]):
    value: V
    load_ms: float
    loaded_at: float
    last_used: float
    uses: int = 0

    @property
    def model(self) -> V:  # the registry's word for the value
        return self.value


class BoundedStore(Generic[V]):
    def __init__(
        self,
        loader: Callable[[str], V],
        max_items: int,
        max_bytes: int,
        eviction: str = "lru",
        idle_unload_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        what: str = "item",
    ):
        if eviction not in ("lru", "lfu"):
            raise ValueError("eviction must be 'lru' or 'lfu'")
        self._loader = loader
        self.max_items = max(1, max_items)
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.idle_unload_s = idle_unload_s
        self.what = what  # for log lines and errors: "model", "avatar frames", ...
        self._clock = clock
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._entries: dict[str, Entry[V]] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        # on_event(event, key, seconds): "hit", "miss", "load" (its seconds), "evict",
        # "unload", "idle_unload" (each service's metrics count them); None: not observed.
        self.on_event: Callable[[str, str, float], None] | None = None

    def _event(self, event: str, key: str, seconds: float = 0.0) -> None:
        if self.on_event is not None:
            self.on_event(event, key, seconds)

    # -- lookups -------------------------------------------------------------------------
    def get(self, key: str) -> V:
        """The item, loading it first if needed; counts one use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._use(entry)
                self._event("hit", key)
                return entry.value
        self._event("miss", key)
        entry, _ = self._load(key)
        with self._lock:
            self._use(entry)
        return entry.value

    def _use(self, entry: Entry[V]) -> None:
        entry.last_used = self._clock()
        entry.uses += 1

    def peek(self, key: str) -> V | None:
        """The item if it is held (no load, no use counted)."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry is not None else None

    def load(self, key: str) -> float:
        """Load (if not held) and return the load time in ms (0 if it was held)."""
        _, load_ms = self._load(key)
        return load_ms

    def unload(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            self._event("unload", key)
            log.info("unloaded %s %s", self.what, key)
        return entry is not None

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> dict[str, Entry[V]]:
        with self._lock:
            return dict(self._entries)

    def loaded_bytes(self) -> int:
        with self._lock:
            return self._bytes()

    def _bytes(self) -> int:
        return sum(e.value.nbytes for e in self._entries.values())

    def preload(self, ids: Iterable[str], every_id: Callable[[], list[str]]) -> None:
        """Load `ids` ("*": every id `every_id` lists), at most `max_items`; an item that
        fails is logged and the others still load."""
        wanted = list(ids)
        if "*" in wanted:
            wanted = every_id()
        for key in wanted[: self.max_items]:
            try:
                self.load(key)
            except Exception as exc:
                log.error("preloading %s %s failed: %s", self.what, key, exc)

    # -- loading and eviction ------------------------------------------------------------
    def _loaded(self, key: str, load_ms: float) -> None:
        """Called with the lock held after `key` was loaded (subclasses count loads)."""

    def _load(self, key: str) -> tuple[Entry[V], float]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry, 0.0
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry, 0.0
            try:
                t0 = time.perf_counter()
                value = self._loader(key)  # raises for unknown or broken items
                load_ms = (time.perf_counter() - t0) * 1000.0
                if value.nbytes > self.max_bytes:
                    raise CapacityError(
                        f"{self.what} {key!r} needs {value.nbytes} bytes, more than the limit "
                        f"of {self.max_bytes} bytes"
                    )
                now = self._clock()
                entry = Entry(value=value, load_ms=load_ms, loaded_at=now, last_used=now)
                with self._lock:
                    self._make_room(value.nbytes)
                    self._entries[key] = entry
                    self._loaded(key, load_ms)
                    self._event("load", key, load_ms / 1000.0)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        log.info("loaded %s %s in %.0f ms (%d bytes)", self.what, key, load_ms, value.nbytes)
        return entry, load_ms

    def _victim(self) -> str:
        if self.eviction == "lfu":
            return min(
                self._entries, key=lambda k: (self._entries[k].uses, self._entries[k].last_used)
            )
        return min(self._entries, key=lambda k: self._entries[k].last_used)

    def _make_room(self, incoming_bytes: int) -> None:
        """Evict until one more item of `incoming_bytes` fits. Caller holds the lock."""
        while self._entries and (
            len(self._entries) + 1 > self.max_items
            or self._bytes() + incoming_bytes > self.max_bytes
        ):
            victim = self._victim()
            del self._entries[victim]
            self._event("evict", victim)
            log.info("evicted %s %s (%s)", self.what, victim, self.eviction)

    def unload_idle(self) -> list[str]:
        """Unload items unused for longer than idle_unload_s; returns their ids."""
        if self.idle_unload_s <= 0:
            return []
        now = self._clock()
        with self._lock:
            idle = [k for k, e in self._entries.items() if now - e.last_used > self.idle_unload_s]
            for k in idle:
                del self._entries[k]
        for k in idle:
            self._event("idle_unload", k)
            log.info("unloaded idle %s %s", self.what, k)
        return idle

    def start_idle_reaper(self, interval_s: float | None = None) -> None:
        if self.idle_unload_s <= 0 or self._reaper is not None:
            return
        interval = interval_s or max(0.5, min(30.0, self.idle_unload_s / 4))

        def run() -> None:
            while not self._stop.wait(interval):
                self.unload_idle()

        self._reaper = threading.Thread(target=run, name="store-idle-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._entries.clear()
