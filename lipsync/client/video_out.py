"""H.264 streams (StreamFrame.h264, docs/DELIVERY.md) out of the client: into an MP4 (or
MKV/MOV) file, or live to an RTMP server (WHIP: lipsync/client/whip.py), by remuxing the
access units the service encoded (no decode, no re-encode); their audio (the frames'
`audio`, s16le 16 kHz mono) is encoded to AAC. And a decoder of access units to BGR
pictures, for checks and for callers who want pixels.

PyAV (the `render` extra) is imported when one of these is used: the base client
install does without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from lipsync.rpc.h264_units import NAL_SPS, nal_types

__all__ = ["H264Muxer", "VideoOutError", "container_format", "decode_access_units"]

AUDIO_RATE = 16000  # StreamFrame.audio: s16le mono at 16 kHz


WHIP_NOT_A_FILE = "a WHIP endpoint (http(s)://) takes a WebRTC session: lipsync.client.whip"


class VideoOutError(RuntimeError):
    """The output cannot be opened or written (no PyAV, endpoint refused, disk full...)."""


def _av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise VideoOutError(
            "H.264 output needs PyAV: pip install 'lipsync-serving[render]'"
        ) from exc
    return av


def decode_access_units(aus: Iterable[bytes]) -> Iterator[np.ndarray]:
    """BGR uint8 pictures of a stream's access units, in order (one per unit)."""
    av = _av()
    codec = av.CodecContext.create("h264", "r")
    codec.thread_count = 1  # one picture out per unit in, no frame-thread delay
    for au in aus:
        for frame in codec.decode(av.Packet(au)):
            yield frame.to_ndarray(format="bgr24")
    for frame in codec.decode(None):
        yield frame.to_ndarray(format="bgr24")


def container_format(target: str) -> str:
    """FFmpeg's muxer for `target`: flv for rtmp(s)://, else from the file's suffix (.mp4,
    .m4v, .mov, .mkv). WHIP endpoints (http(s)://) are lipsync.client.whip's: FFmpeg's WHIP
    muxer in PyAV's wheel did not complete a DTLS handshake with aiortc here
    (docs/DELIVERY.md)."""
    lower = target.lower()
    if lower.startswith(("rtmp://", "rtmps://")):
        return "flv"
    if lower.startswith(("http://", "https://")):
        raise VideoOutError(WHIP_NOT_A_FILE)
    for suffix, fmt in ((".mp4", "mp4"), (".m4v", "mp4"), (".mov", "mov"), (".mkv", "matroska")):
        if lower.endswith(suffix):
            return fmt
    raise VideoOutError(
        f"cannot tell how to write {target!r}: a .mp4/.m4v/.mov/.mkv file, an rtmp:// URL"
    )


class H264Muxer:
    """Access units (Annex B, in frame order, the first a keyframe) and their audio into
    a container. Frames before the first keyframe are dropped (a decoder could not start
    there); timestamps come from the frames' indices, so skipped slots stay gaps.

        with H264Muxer("out.mp4", fps=25) as mux:
            for f in client.stream(..., video_codec="h264", return_audio=True):
                mux.write(f.index, f.h264, f.keyframe, f.audio)
    """

    def __init__(
        self, target: str, fps: float, *, audio: bool = True, timeout_s: float = 10.0
    ) -> None:
        self.target = target
        self.format = container_format(target)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.audio = audio
        self.timeout_s = timeout_s
        self.frames = 0
        self.dropped = 0
        self._av = _av()
        self._container: Any = None
        self._video: Any = None
        self._sound: Any = None
        self._first_index = 0

    def __enter__(self) -> H264Muxer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, au: bytes) -> None:
        av = self._av
        width, height = _size_of(au)
        options = {}
        if self.format == "mp4":
            options["movflags"] = "+faststart"
        try:
            self._container = av.open(
                self.target,
                "w",
                format=self.format,
                options=options,
                timeout=(self.timeout_s, self.timeout_s),
            )
            self._video = self._container.add_mux_stream(
                "h264", rate=self.rate, width=width, height=height
            )
            self._video.time_base = 1 / self.rate
            if self.audio:
                self._sound = self._container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
                self._resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        except (OSError, av.FFmpegError, ValueError) as exc:
            self.close()
            raise VideoOutError(f"cannot open {self.target}: {exc}") from exc

    def write(self, index: int, au: bytes, keyframe: bool, audio: bytes = b"") -> None:
        """Frame `index` of the stream: its access unit and its audio (s16le 16 kHz)."""
        av = self._av
        if self._container is None:
            if not keyframe:
                self.dropped += 1
                return
            self._first_index = index
            self._open(au)
        t = index - self._first_index
        packet = av.Packet(au)
        packet.stream = self._video
        packet.pts = packet.dts = t
        packet.time_base = 1 / self.rate  # rescaled to the stream's by the muxer
        packet.is_keyframe = keyframe
        try:
            self._container.mux(packet)
            if self._sound is not None and audio:
                self._write_audio(t, audio)
        except (OSError, av.FFmpegError) as exc:
            raise VideoOutError(f"writing to {self.target} failed: {exc}") from exc
        self.frames += 1

    def _write_audio(self, t: int, audio: bytes) -> None:
        av = self._av
        pcm = np.frombuffer(audio, "<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = round(t * AUDIO_RATE / self.rate)
        frame.time_base = Fraction(1, AUDIO_RATE)
        for resampled in self._resampler.resample(frame):
            self._container.mux(self._sound.encode(resampled))

    def close(self) -> None:
        """Flush the audio encoder and finish the container (a file's index, the end of
        a live stream). Safe to call twice."""
        container, self._container = self._container, None
        if container is None:
            return
        try:
            if self._sound is not None:
                for resampled in self._resampler.resample(None):
                    container.mux(self._sound.encode(resampled))
                container.mux(self._sound.encode(None))
        finally:
            container.close()


def _size_of(au: bytes) -> tuple[int, int]:
    """(width, height) of a keyframe's pictures: decoded once (parsing the SPS by hand
    would be more code than this)."""
    if NAL_SPS not in nal_types(au):
        raise VideoOutError("the first keyframe carries no SPS")
    for bgr in decode_access_units([au]):
        return bgr.shape[1], bgr.shape[0]
    raise VideoOutError("the first keyframe does not decode")
