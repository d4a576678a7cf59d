"""Which background frame each output frame is drawn on (docs/SEMANTICS.md, "Background
frames"): the reference walks an avatar's frames forth and back."""

from __future__ import annotations

__all__ = ["background_indices", "pingpong"]


def pingpong(t: int, n: int) -> int:
    """Background frame of stream frame t over n frames: 0, 1, .., n-1, n-2, .., 1, 0, 1, ..

    `m = t mod 2(n-1)`, then `m` if `m < n` else `2(n-1) - m` (the reference's walk).
    """
    if n <= 1:
        return 0
    m = t % (2 * (n - 1))
    return m if m < n else 2 * (n - 1) - m


def background_indices(start: int, count: int, n_frames: int) -> list[int]:
    """Background frames of output frames ``start .. start + count - 1``."""
    return [pingpong(start + k, n_frames) for k in range(count)]
