"""Compositing: each inferred batch's mouths pasted into its background frames and
JPEG-encoded, batch after batch in the order they come (one thread), into frames ready
for the output stage."""

from __future__ import annotations

from dataclasses import dataclass

from compositing_service.compositor import Compositor
from compositing_service.frames import AvatarFrames
from compositing_service.streaming.infer_stage import InferredBatch


@dataclass
class OutFrame:
    """A made speech frame, waiting for its slot."""

    epoch: int
    slot: int
    jpeg: bytes
    speech: bool
    clip: int
    clip_frame: int
    background: int
    audio: bytes
    arrival: float  # when the last audio it needed arrived


class CompositeStage:
    def __init__(self, avatar: AvatarFrames, compositor: Compositor):
        self.avatar = avatar
        self.compositor = compositor
        self._epoch = 0

    def interrupt(self, epoch: int) -> None:
        self._epoch = epoch

    def run(self, item: InferredBatch) -> list[OutFrame] | None:
        """The batch's frames in order; None if an interrupt dropped it."""
        if item.epoch < self._epoch:
            return None
        jpegs = self.compositor.composite(self.avatar, item.backgrounds, item.mouths, item.crops)
        b = item.batch
        return [
            OutFrame(
                b.epoch,
                b.slot + k,
                jpeg,
                item.speech[k],
                b.clip,
                b.first + k,
                item.backgrounds[k],
                item.audio[k],
                b.arrivals[k],
            )
            for k, jpeg in enumerate(jpegs)
        ]
