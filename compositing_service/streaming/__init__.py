"""Streaming sessions (StreamComposite): audio chunks in, JPEG frames out as soon as the
audio they need has arrived (docs/STREAMING.md).

The session is a pipeline of small stages, each usable alone:

- `ingest`: chunk decoding, resampling, clips of 16 kHz samples that forget their head;
- `planner`: which frames are final, batches of at most `max_batch`, where a clip goes
  on the timeline (`schedule`), gap flush;
- `infer_stage`: clip tail and face crops to the inference service, speech flags,
  per-frame audio;
- `composite_stage`: paste and JPEG, in order;
- `output`: `RealtimePacer` (paced at the avatar's fps, idle frames) or `OfflineSink`;
- `session`: `StreamSession`, the wiring, threads and events (interrupt, failure,
  cancel);
- `open_streams`: `OpenStreams`, the service's bound on open streams and what shutdown
  does to them (drain, stop).
"""

from compositing_service.streaming.ingest import StreamError
from compositing_service.streaming.open_streams import OpenStreams, StreamsClosed
from compositing_service.streaming.output import LATE, SKIPPED, PaceCounts
from compositing_service.streaming.session import StreamSession, in_context_thread

__all__ = [
    "LATE",
    "SKIPPED",
    "OpenStreams",
    "PaceCounts",
    "StreamError",
    "StreamSession",
    "StreamsClosed",
    "in_context_thread",
]
