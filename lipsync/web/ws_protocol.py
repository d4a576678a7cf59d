"""The page <-> gateway WebSocket protocol (docs/DELIVERY.md, "The WebSocket fallback"):
the start message, the binary frame message and their limits."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from lipsync.proto import compositing_pb2 as cpb

MAX_WS_MESSAGE_BYTES = 4 << 20  # one audio chunk from the page
START_TIMEOUT_S = 30.0  # the start message must come within this long
AUDIO_RATE = 16000  # of the audio each frame carries (StreamFrame.audio)
HEADER_LEN = struct.Struct("<I")


class ProtocolError(ValueError):
    """The page sent something the protocol does not allow; the message says what."""


def wall_ms() -> float:
    return time.time() * 1000.0


def pack_frame(frame: cpb.StreamFrame, recv_ms: float) -> bytes:
    """One StreamFrame as the binary WebSocket message:
    `[u32 LE n][n bytes of JSON header][audio bytes][JPEG bytes]`."""
    pcm, jpeg = frame.audio, frame.jpeg  # each read of a bytes field copies it
    header = {
        "index": frame.index,
        "pts_ms": frame.pts_ms,
        "speech": frame.speech,
        "generated": frame.generated,
        "clip": frame.clip,
        "clip_frame": frame.clip_frame,
        "background_frame": frame.background_frame,
        "latency_ms": round(float(frame.latency_ms), 3),
        "recv_ms": round(recv_ms, 3),
        "sent_ms": round(wall_ms(), 3),
        "audio_len": len(pcm),
        "jpeg_len": len(jpeg),
        "audio_rate": AUDIO_RATE,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((HEADER_LEN.pack(len(head)), head, pcm, jpeg))


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, s16le audio, JPEG) of a binary frame message."""
    (n,) = HEADER_LEN.unpack_from(data)
    header = json.loads(data[4 : 4 + n])
    a = 4 + n
    j = a + header["audio_len"]
    if j + header["jpeg_len"] != len(data):
        raise ValueError("frame message length does not match its header")
    return header, data[a:j], data[j:]


def parse_start(msg: Any) -> cpb.StreamStart:
    """The StreamStart of the page's first message (a JSON text message)."""
    if not isinstance(msg, str):
        raise ProtocolError('the first message must be the text message {"type": "start", ...}')
    try:
        obj = json.loads(msg)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"the start message is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("type") != "start":
        raise ProtocolError('the first message must be {"type": "start", ...}')
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("start: 'model' must be a non-empty string")

    def integer(key: str, default: int) -> int:
        v = obj.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
            raise ProtocolError(f"start: '{key}' must be a non-negative integer, got {v!r}")
        return v

    realtime = obj.get("realtime", True)
    if not isinstance(realtime, bool):
        raise ProtocolError("start: 'realtime' must be true or false")
    return cpb.StreamStart(
        model_id=model,
        sample_rate=integer("sample_rate", 0),
        start_frame_idx=integer("start_frame_idx", 0),
        realtime=realtime,
        audio_encoding=cpb.PCM_F32LE,
        return_audio=True,
    )


__all__ = [
    "AUDIO_RATE",
    "MAX_WS_MESSAGE_BYTES",
    "START_TIMEOUT_S",
    "ProtocolError",
    "pack_frame",
    "parse_start",
    "unpack_frame",
    "wall_ms",
]
