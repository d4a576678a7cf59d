"""Streaming: when is a frame of a still-growing clip final? (docs/SEMANTICS.md,
"Lookahead"; docs/STREAMING.md)

Frame i reads encoder rows up to i + 6; row j reads mel frames s_j .. s_j + 15
(s_j = 16 j // 5); mel frame t covers samples [200 t - 400, 200 t + 400). Once those
samples have arrived, more audio can change neither the rows nor n's effect on frame i.
"""

from __future__ import annotations

from lipsync.core.audio import HALF_CONTEXT, HOP, MEL_FPS, N_FFT, VIDEO_FPS, WINDOW

__all__ = [
    "LOOKAHEAD_ROWS",
    "TAIL_ALIGN",
    "clip_span",
    "ready_frames",
    "samples_needed",
    "tail_offset",
]

LOOKAHEAD_ROWS = HALF_CONTEXT - 2  # 6


def samples_needed(frame: int) -> int:
    """16 kHz samples of a clip that must have arrived before `frame` is final (while the
    clip is still growing). About 40 ms x frame + 452.5 ms: the algorithmic lookahead."""
    last_window = (MEL_FPS * (frame + LOOKAHEAD_ROWS)) // VIDEO_FPS
    return HOP * (last_window + WINDOW - 1) + N_FFT // 2


def ready_frames(n_samples: int) -> int:
    """How many leading frames of a still-growing clip of `n_samples` samples are final."""
    q = (n_samples - N_FFT // 2) // HOP - (WINDOW - 1)  # last usable window start
    if q < 0:
        return 0
    return max(0, (VIDEO_FPS * (q + 1) - 1) // MEL_FPS + 1 - LOOKAHEAD_ROWS)


TAIL_ALIGN = WINDOW * HOP  # 3200 samples = 16 mel rows = 5 video frames


def tail_offset(first_frame: int) -> int:
    """Where a clip tail may start (a multiple of TAIL_ALIGN) so that frames from
    `first_frame` on are computed exactly as from the whole clip."""
    return TAIL_ALIGN * max(0, (first_frame - 12) // 5)


def clip_span(total_samples: int, first_frame: int, last_frame: int) -> tuple[int, int]:
    """The samples [start, stop) of a whole clip of `total_samples` 16 kHz samples that
    frames `first_frame .. last_frame` read: the aligned tail behind the first frame (never
    past the clip's last frame, so frames far past the clip's end cost nothing: they read
    the last rows or zeros, docs/SEMANTICS.md "Audio blocks") to the last frame's
    lookahead. Computing on the span gives these frames exactly what the whole clip gives.
    """
    q = (total_samples + HOP - 1) // HOP  # about the clip's frames (mel rows x 25/80)
    last_frame_of_clip = max(0, (q * VIDEO_FPS) // MEL_FPS - 1)
    first = min(first_frame, last_frame_of_clip)
    start = min(tail_offset(first), total_samples)
    stop = min(total_samples, samples_needed(max(last_frame, first)))
    return start, max(start, stop)
