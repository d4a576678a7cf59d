"""Compositing: each inferred batch's mouths pasted into its background frames and
JPEG-encoded, batch after batch in the order they come (one thread), into frames ready
for the output stage. An H.264 stream's frames stay pictures (`OutFrame.image`): the
output stage encodes them in the order it sends them (compositing_service/video_encoder.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    image: np.ndarray | None = None  # the composited picture (H.264 streams; jpeg is b"")


class CompositeStage:
    def __init__(self, avatar: AvatarFrames, compositor: Compositor, *, jpeg: bool = True):
        self.avatar = avatar
        self.compositor = compositor
        self.jpeg = jpeg  # False: pictures for the output stage's video encoder
        self._epoch = 0

    def interrupt(self, epoch: int) -> None:
        self._epoch = epoch

    def run(self, item: InferredBatch) -> list[OutFrame] | None:
        """The batch's frames in order; None if an interrupt dropped it."""
        if item.epoch < self._epoch:
            return None
        args = (self.avatar, item.backgrounds, item.mouths, item.crops)
        if self.jpeg:
            jpegs = self.compositor.composite(*args)
            images: list[np.ndarray | None] = [None] * len(jpegs)
        else:
            images = list(self.compositor.composite_images(*args))
            jpegs = [b""] * len(images)
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
                image,
            )
            for k, (jpeg, image) in enumerate(zip(jpegs, images, strict=True))
        ]
