"""H.264 encoding of a stream's frames (StreamStart.video_codec = VIDEO_CODEC_H264;
docs/DELIVERY.md), with PyAV.

One `H264Encoder` per stream, fed every frame the stream sends, in order (idle frames
included): each call returns one Annex B access unit and whether it is a keyframe (an IDR
picture, with SPS and PPS in front of it). Zero-latency settings: no B-frames, no
lookahead, no frame threads, so each frame's access unit comes out of the call that took
the frame. Constrained baseline profile, so every browser's decoder takes it. Keyframes
every `keyframe_interval_s` (no scene-cut keyframes: the bitrate stays predictable) and on
request (`request_keyframe`, from any thread: the next frame encoded is an IDR).

The encoder is a config key (`compositing.stream.h264.encoder`): a list of FFmpeg encoder
names, of which the service uses the first that opens (`choose_encoder`, at start), so an
operator can put NVENC first and keep libx264 as the fallback. What PyAV's wheels carry
and under which licences: docs/DELIVERY.md.

Frames are converted BGR -> YUV 4:2:0 by OpenCV (BT.601, limited range, flagged so in
the SPS's VUI). 4:2:0 needs an even width and height: an odd one loses its last pixel
column or row (cropped, not padded: no invented pixels reach the viewer).
"""

from __future__ import annotations

import logging
import threading
from fractions import Fraction
from typing import Any

import cv2
import numpy as np

from lipsync.config import H264Config
from lipsync.rpc.h264_units import NAL_PPS, NAL_SPS, nal_types, parameter_sets

log = logging.getLogger(__name__)

# BT.601 (what cv2.COLOR_BGR2YUV_I420 computes), limited range: FFmpeg's enum values.
_COLORSPACE_SMPTE170M = 6
_RANGE_MPEG = 1
_PROBE_SIZE = (64, 64)
_PROBE_FRAMES = 3


class EncoderError(RuntimeError):
    """No configured encoder can be used, or one failed while encoding."""


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # the compositing extra installs it
        raise EncoderError(
            "H.264 streams need PyAV: pip install 'lipsync-serving[compositing]'"
        ) from exc
    return av


def encoder_options(name: str, cfg: H264Config) -> dict[str, str]:
    """The FFmpeg private options of encoder `name` for zero-latency constrained
    baseline; an encoder not listed here gets only the generic settings."""
    if name == "libx264":
        return {
            "preset": cfg.preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "forced-idr": "1",  # a requested keyframe is an IDR, not a recovery point
            "x264-params": "scenecut=0:repeat-headers=1",
        }
    if name == "libopenh264":
        return {"profile": "constrained_baseline", "allow_skip_frames": "0"}
    if name == "h264_nvenc":
        return {
            "preset": "p1",
            "tune": "ull",
            "profile": "baseline",
            "zerolatency": "1",
            "delay": "0",
            "forced-idr": "1",
            "no-scenecut": "1",
        }
    if name in ("h264_qsv", "h264_amf", "h264_vaapi"):
        return {"profile": "constrained_baseline"}
    return {}


class H264Encoder:
    """One stream's H.264 encoder: BGR frames in, Annex B access units out."""

    def __init__(self, name: str, cfg: H264Config, width: int, height: int, fps: float):
        av = _av()
        self.name = name
        self.width, self.height = width & ~1, height & ~1
        if self.width < 2 or self.height < 2:
            raise EncoderError(f"frames of {width}x{height} are too small for H.264")
        rate = Fraction(fps).limit_denominator(1001)
        try:
            ctx = av.CodecContext.create(name, "w")
        except Exception as exc:  # unknown to this FFmpeg build
            raise EncoderError(f"encoder {name!r}: {exc}") from exc
        ctx.width, ctx.height = self.width, self.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.bit_rate = cfg.bitrate_kbps * 1000
        ctx.gop_size = max(1, round(cfg.keyframe_interval_s * float(rate)))
        ctx.max_b_frames = 0
        ctx.thread_count = cfg.threads
        ctx.colorspace = _COLORSPACE_SMPTE170M
        ctx.color_range = _RANGE_MPEG
        # VBV: at most the bitrate over any second (what a 1-second player buffer absorbs)
        vbv = str(cfg.bitrate_kbps * 1000)
        ctx.options = {"maxrate": vbv, "bufsize": vbv, **encoder_options(name, cfg)}
        try:
            ctx.open()
        except Exception as exc:  # no device, no licence, options it refuses, ...
            raise EncoderError(f"encoder {name!r} does not open: {exc}") from exc
        self._av = av
        self._ctx: Any = ctx
        self._lock = threading.Lock()
        self._pts = 0
        self._want_key = False
        self._params: list[bytes] = []  # the last SPS and PPS seen
        self.frames = 0
        self.bytes = 0

    def request_keyframe(self) -> None:
        """The next frame encoded is an IDR picture (any thread)."""
        self._want_key = True

    def encode(self, bgr: np.ndarray) -> tuple[bytes, bool]:
        """One frame (BGR uint8, the stream's size) -> (access unit, keyframe)."""
        h, w = bgr.shape[:2]
        if (w & ~1, h & ~1) != (self.width, self.height):
            raise EncoderError(f"frame of {w}x{h} in a {self.width}x{self.height} stream")
        i420 = cv2.cvtColor(bgr[: self.height, : self.width], cv2.COLOR_BGR2YUV_I420)
        frame = self._av.VideoFrame.from_ndarray(i420, format="yuv420p")
        with self._lock:
            if self._ctx is None:
                raise EncoderError("the encoder is closed")
            frame.pts = self._pts
            self._pts += 1
            if self._want_key:
                self._want_key = False
                frame.pict_type = self._av.video.frame.PictureType.I
            try:
                packets = self._ctx.encode(frame)
            except Exception as exc:
                raise EncoderError(f"encoder {self.name!r} failed: {exc}") from exc
            if len(packets) != 1:  # settings that delay frames break the stream's contract
                raise EncoderError(
                    f"encoder {self.name!r} gave {len(packets)} access units for one frame"
                )
            data, key = bytes(packets[0]), bool(packets[0].is_keyframe)
            if key:
                data = self._with_parameter_sets(data)
            self.frames += 1
            self.bytes += len(data)
            return data, key

    def _with_parameter_sets(self, au: bytes) -> bytes:
        """A keyframe with SPS and PPS in front (libx264 repeats them itself; an encoder
        that sends them once gets the last ones put back)."""
        types = nal_types(au)
        if NAL_SPS in types and NAL_PPS in types:
            self._params = parameter_sets(au)
            return au
        if not self._params:
            raise EncoderError(f"encoder {self.name!r} sent a keyframe without SPS/PPS")
        return b"".join(b"\x00\x00\x00\x01" + u for u in self._params) + au

    def close(self) -> None:
        """Free the encoder (any thread; later `encode` calls raise EncoderError)."""
        with self._lock:
            self._ctx = None

    @property
    def closed(self) -> bool:
        return self._ctx is None


def choose_encoder(cfg: H264Config) -> str:
    """The first of `cfg.encoder` that opens and encodes a few frames one access unit
    each, with a keyframe carrying SPS and PPS first; EncoderError listing why each
    failed when none does (the service refuses to start: an operator's typo should not
    surface as every H.264 stream failing)."""
    failures = []
    for name in cfg.encoder:
        try:
            enc = H264Encoder(name, cfg, *_PROBE_SIZE, 25.0)
            try:
                frame = np.zeros((*_PROBE_SIZE, 3), np.uint8)
                first, key = enc.encode(frame)
                for _ in range(_PROBE_FRAMES - 1):
                    enc.encode(frame)
            finally:
                enc.close()
            if not key or NAL_SPS not in nal_types(first):
                raise EncoderError(f"encoder {name!r} did not start with a keyframe")
        except EncoderError as exc:
            failures.append(str(exc))
            log.warning("H.264 encoder %s unusable: %s", name, exc)
            continue
        return name
    raise EncoderError(
        "no usable H.264 encoder in compositing.stream.h264.encoder: " + "; ".join(failures)
    )
