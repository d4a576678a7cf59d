"""What loading a model costs in memory, measured (GetModelStats.memory_bytes): the growth
of the process's resident memory across the load, plus the growth of the GPU memory in
use on the service's device where NVML (`nvidia-ml-py`) reports it.

It is a measurement, not an accounting: loads running at the same time see each other's
growth, memory the allocator returns later is not subtracted, and ONNX Runtime's arenas
grow further on the first runs (docs/OPERATIONS.md)."""

from __future__ import annotations

import os
import resource


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc; elsewhere the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_used_bytes(device_id: int) -> int | None:
    """GPU memory in use on `device_id` (all processes), or None without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


class LoadMeter:
    """Memory growth across a load: `with LoadMeter(dev) as m: load()`, then `m.bytes`."""

    def __init__(self, device_id: int):
        self.device_id = device_id
        self.bytes = 0

    def __enter__(self) -> LoadMeter:
        self._rss = resident_bytes()
        self._gpu = gpu_used_bytes(self.device_id)
        return self

    def __exit__(self, *exc: object) -> None:
        grown = max(0, resident_bytes() - self._rss)
        if self._gpu is not None:
            after = gpu_used_bytes(self.device_id)
            if after is not None:
                grown += max(0, after - self._gpu)
        self.bytes = grown
