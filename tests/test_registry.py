"""The model registry: lazy loading, capacity by count and bytes, LRU/LFU, idle unload."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from inference_service.registry import CapacityError, ModelRegistry


@dataclass
class Fake:
    name: str
    nbytes: int


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0  # every call is a distinct instant
        return self.t


def make(max_models=3, max_bytes=1000, eviction="lru", idle=0.0, sizes=None, clock=None):
    sizes = sizes or {}
    loads: list[str] = []

    def loader(model_id: str) -> Fake:
        if model_id == "broken":
            raise FileNotFoundError("no unet.onnx")
        loads.append(model_id)
        return Fake(model_id, sizes.get(model_id, 100))

    reg = ModelRegistry(loader, max_models, max_bytes, eviction, idle, clock=clock or Clock())
    return reg, loads


def test_lazy_load_once():
    reg, loads = make()
    assert reg.loaded_ids() == []
    assert reg.get("a").name == "a"
    assert reg.get("a").name == "a"
    assert loads == ["a"]
    assert reg.load("a") == 0.0  # already loaded


def test_lru_evicts_least_recently_used_by_count():
    reg, _ = make(max_models=3)
    for m in "abc":
        reg.get(m)
    reg.get("a")  # b is now the least recently used
    reg.get("d")
    assert reg.loaded_ids() == ["a", "c", "d"]


def test_lfu_evicts_least_frequently_used():
    reg, _ = make(max_models=3, eviction="lfu")
    for m, uses in (("a", 5), ("b", 1), ("c", 3)):
        for _ in range(uses):
            reg.get(m)
    reg.get("d")
    assert reg.loaded_ids() == ["a", "c", "d"]
    reg.get("e")  # d (1 use, newer than nothing else with 1 use) goes
    assert reg.loaded_ids() == ["a", "c", "e"]


def test_capacity_by_bytes():
    reg, _ = make(max_models=10, max_bytes=1000, sizes={"a": 400, "b": 400, "c": 300, "big": 900})
    reg.get("a")
    reg.get("b")
    reg.get("c")  # 1100 > 1000: a (LRU) goes
    assert reg.loaded_ids() == ["b", "c"]
    reg.get("big")  # needs everything else gone
    assert reg.loaded_ids() == ["big"]
    assert reg.snapshot().loaded_bytes == 900


def test_model_larger_than_capacity_is_refused_and_nothing_is_lost():
    reg, _ = make(max_bytes=500, sizes={"a": 100, "huge": 600})
    reg.get("a")
    with pytest.raises(CapacityError):
        reg.get("huge")
    assert reg.loaded_ids() == ["a"]


def test_failed_load_raises_and_keeps_others():
    reg, _ = make()
    reg.get("a")
    with pytest.raises(FileNotFoundError):
        reg.get("broken")
    assert reg.loaded_ids() == ["a"]


def test_unload_and_usage_stats_survive_unload():
    reg, _ = make()
    reg.get("a")
    reg.record("a", frames=24, ms=120.0)
    assert reg.unload("a")
    assert not reg.unload("a")
    snap = reg.snapshot()
    assert "a" not in snap.loaded
    assert snap.usage["a"].frames == 24 and snap.usage["a"].requests == 1


def test_idle_unload():
    clock = Clock()
    reg, _ = make(idle=5.0, clock=clock)
    reg.get("a")
    reg.get("b")
    clock.t += 3
    reg.get("b")
    clock.t += 3  # a idle for ~7, b for ~4
    assert reg.unload_idle() == ["a"]
    assert reg.loaded_ids() == ["b"]


def test_idle_reaper_thread_unloads():
    reg, _ = make(idle=0.05, clock=time.monotonic)
    reg.get("a")
    reg.start_idle_reaper(interval_s=0.02)
    deadline = time.monotonic() + 5
    while reg.loaded_ids() and time.monotonic() < deadline:
        time.sleep(0.02)
    reg.close()
    assert reg.loaded_ids() == []


def test_concurrent_first_requests_load_once():
    gate = threading.Event()
    loads = []

    def slow_loader(model_id: str) -> Fake:
        loads.append(model_id)
        gate.wait(2)
        return Fake(model_id, 10)

    reg = ModelRegistry(slow_loader, 4, 1000)
    results = []
    threads = [threading.Thread(target=lambda: results.append(reg.get("a"))) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert loads == ["a"]
    assert len({id(r) for r in results}) == 1
