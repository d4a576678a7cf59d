"""What a client of the compositing port installs (the base install): the gRPC client
(`grpc_client.py`), and, with the `render` extra, rendering a clip to files (`render.py`,
`media.py`; `lipsync-render`).

    from lipsync.client import LipsyncClient, load_audio
"""

from lipsync.client.grpc_client import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    BatchResult,
    LipsyncClient,
    LipsyncError,
    LiveStream,
    chunked,
    clip_frames,
    clip_requests,
    load_audio,
    pad_audio,
    to_pcm16,
)

__all__ = [
    "MIN_SAMPLES",
    "SAMPLE_RATE",
    "BatchResult",
    "LipsyncClient",
    "LipsyncError",
    "LiveStream",
    "chunked",
    "clip_frames",
    "clip_requests",
    "load_audio",
    "pad_audio",
    "to_pcm16",
]
