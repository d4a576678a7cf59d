"""A small Python client of the compositing service (port 50052).

    from lipsync.client import LipsyncClient, load_audio

    audio, seconds = load_audio("speech.wav")          # float32 mono 16 kHz
    with LipsyncClient("localhost:50052") as client:
        for jpeg in client.render("alice", audio):     # one JPEG per 25 fps video frame
            ...

`render` sends the clip once through an offline StreamComposite session (or, with
`mode="batch"`, in InferBatchComposite requests that step `clip_frame_offset` and
`start_frame_idx`); either way the frames are those of the clip as one piece.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np

from lipsync.core.audio import MIN_SAMPLES, SAMPLE_RATE, pad_to_min_clip, resample_to_16k, to_int16
from lipsync.core.windows import frames_of_samples
from lipsync.proto import compositing_pb2 as cpb
from lipsync.proto import compositing_pb2_grpc as cpb_grpc
from lipsync.rpc.bearer import bearer_metadata
from lipsync.rpc.channel import message_options
from lipsync.rpc.errors import rpc_error_message
from lipsync.rpc.tls import TLSConfigError, channel_credentials

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "localhost:50052"
API_KEY_ENV = "LIPSYNC_API_KEY"
MAX_MESSAGE_BYTES = 256 << 20  # the services' default limits.max_message_bytes
# StreamStart.video_codec by name (docs/DELIVERY.md)
VIDEO_CODECS = {"jpeg": cpb.VIDEO_CODEC_JPEG, "h264": cpb.VIDEO_CODEC_H264}


def _video_codec(name: str) -> int:
    if name not in VIDEO_CODECS:
        raise ValueError(f"video_codec must be one of {', '.join(VIDEO_CODECS)}")
    return VIDEO_CODECS[name]


class LipsyncError(RuntimeError):
    """A request the service refused or could not answer.

    `code` is the gRPC status code when the call itself failed (None when the service
    answered `success=false`).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class BatchResult:
    """What one `InferBatchComposite` request returned."""

    frames: list[bytes]  # JPEG bytes, one per frame, in order
    background_frame_indices: list[int]
    inference_time_ms: float = 0.0
    composite_time_ms: float = 0.0
    total_time_ms: float = 0.0
    stage_times_ms: dict[str, float] = field(default_factory=dict)
    gpu_id: int = 0


# -- audio ----------------------------------------------------------------------------------
def clip_frames(n_samples: int) -> int:
    """Video frames (25 fps) a 16 kHz clip of `n_samples` samples yields.

    `T = 1 + n_samples // 200` mel frames give `n + 2` frames with
    `n = int((T - 16) / 80 * 25) + 2`; clips shorter than `MIN_SAMPLES` (3000) are refused
    by the service (pad them with `pad_audio`).
    """
    return frames_of_samples(n_samples)


def pad_audio(audio16k: np.ndarray) -> tuple[np.ndarray, bool]:
    """Zero-pad a clip shorter than `MIN_SAMPLES` to that length; returns (audio, padded)."""
    return pad_to_min_clip(audio16k)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 (`rint(32768 x)`, clipped); int16 is kept as is."""
    return to_int16(audio)


def load_audio(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an audio file as float32 mono 16 kHz samples; returns (samples, seconds).

    wav/flac/ogg (and mp3 where libsndfile supports it) are read with soundfile, anything
    soundfile cannot read with librosa. Channels are averaged to mono, then any other rate
    is resampled with soxr (HQ). Raises `LipsyncError` when the file cannot be read.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise LipsyncError(f"audio file not found: {p}")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
        x = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_exc:
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its audioread fallback's warnings
                x, sr = librosa.load(str(p), sr=None, mono=True)
        except Exception as exc:
            raise LipsyncError(f"cannot read audio file {p}: {sf_exc}; {exc}") from exc
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size == 0:
        raise LipsyncError(f"audio file {p} has no samples")
    if not np.isfinite(x).all():
        raise LipsyncError(f"audio file {p} contains NaN or infinite samples")
    if sr != SAMPLE_RATE:
        x = resample_to_16k(x, int(sr))
    return x, x.size / SAMPLE_RATE


# -- the client -----------------------------------------------------------------------------
class LipsyncClient:
    """Client of the compositing service; a context manager that closes its channel.

    Calls that fail at the gRPC level (service unreachable, unknown model in
    `load_model`, deadline exceeded, ...) raise `LipsyncError` with a readable message,
    and so does a render request the service answers with `success=false`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout_s: float = 60.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        api_key: str | None = None,
    ):
        """`ca_file`: connect with TLS, trusting that CA (PEM); `cert_file`/`key_file`: a
        client certificate (mutual TLS). `api_key` (default `$LIPSYNC_API_KEY`) is sent as
        `authorization: Bearer <key>` with every call (docs/SECURITY.md)."""
        self.address = address
        self.timeout_s = timeout_s
        try:
            credentials = channel_credentials(
                *(str(f) if f else None for f in (ca_file, cert_file, key_file))
            )
        except TLSConfigError as exc:
            raise LipsyncError(str(exc)) from None
        options = message_options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = cpb_grpc.CompositingServiceStub(self._channel)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._metadata = bearer_metadata(key)

    # context manager -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> LipsyncClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # plumbing ------------------------------------------------------------------------------
    def _call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return getattr(self._stub, method)(
                request,
                timeout=self.timeout_s if timeout_s is None else timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, method) from None

    def _error(self, exc: grpc.RpcError, method: str) -> LipsyncError:
        code = exc.code() if hasattr(exc, "code") else None
        return LipsyncError(rpc_error_message(exc, "compositing service", self.address), code)

    # simple RPCs ---------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> cpb.HealthResponse:
        """The service's `HealthResponse` (healthy, loaded_models, inference health, ...)."""
        return self._call("Health", cpb.HealthRequest(), timeout_s)  # type: ignore[return-value]

    def list_models(self) -> list[cpb.ModelInfo]:
        """Every avatar the service knows, with whether it is loaded and its frame sizes."""
        resp = self._call("ListModels", cpb.ListModelsRequest())
        return list(resp.models)  # type: ignore[attr-defined]

    def load_model(self, model_id: str) -> float:
        """Load an avatar's networks and frames; returns the load time in ms."""
        resp = self._call("LoadModel", cpb.LoadModelRequest(model_id=model_id))
        if not resp.success:  # type: ignore[attr-defined]
            raise LipsyncError(resp.error or f"loading {model_id!r} failed")  # type: ignore[attr-defined]
        return float(resp.load_time_ms)  # type: ignore[attr-defined]

    def unload_model(self, model_id: str) -> bool:
        """Unload an avatar; returns False when it was not loaded (the service's error)."""
        resp = self._call("UnloadModel", cpb.UnloadModelRequest(model_id=model_id))
        return bool(resp.success)  # type: ignore[attr-defined]

    def model_stats(self, model_id: str = "") -> cpb.GetModelStatsResponse:
        """Per-model statistics (`stats`) and registry totals; empty id: every model."""
        return self._call(  # type: ignore[return-value]
            "GetModelStats", cpb.GetModelStatsRequest(model_id=model_id)
        )

    # rendering -----------------------------------------------------------------------------
    def composite_batch(
        self,
        model_id: str,
        batch_size: int,
        *,
        audio: np.ndarray | None = None,
        audio_features: np.ndarray | bytes | None = None,
        visual_frames: np.ndarray | bytes | None = None,
        start_frame_idx: int = 0,
        clip_frame_offset: int = 0,
        sample_rate: int = SAMPLE_RATE,
    ) -> BatchResult:
        """Render `batch_size` frames with one `InferBatchComposite` request.

        `audio` is the whole clip: float32 samples (sent as PCM_F32LE) or int16 samples
        (sent as PCM_S16LE) at `sample_rate`; output frame k is the clip's frame
        `clip_frame_offset + k`, its background `pingpong(start_frame_idx + k)`.
        `audio_features` (float32 [B, 32, 16, 16] or [32, 16, 16]) and `visual_frames`
        (float32 [B, 6, 320, 320]) are passed through as raw bytes.
        Raises `LipsyncError` with the service's message when it answers success=false.
        """
        req = cpb.CompositeBatchRequest(
            model_id=model_id,
            batch_size=batch_size,
            start_frame_idx=start_frame_idx,
            clip_frame_offset=clip_frame_offset,
        )
        if audio is not None:
            a = np.asarray(audio).reshape(-1)
            if a.dtype == np.int16:
                req.raw_audio = a.astype("<i2", copy=False).tobytes()
                req.audio_encoding = cpb.PCM_S16LE
            else:
                req.raw_audio = a.astype("<f4", copy=False).tobytes()
                req.audio_encoding = cpb.PCM_F32LE
            req.sample_rate = 0 if sample_rate == SAMPLE_RATE else int(sample_rate)
        if audio_features is not None:
            req.audio_features = _as_f32_bytes(audio_features)
        if visual_frames is not None:
            req.visual_frames = _as_f32_bytes(visual_frames)
        resp = self._call("InferBatchComposite", req)
        if not resp.success:  # type: ignore[attr-defined]
            raise LipsyncError(resp.error or "InferBatchComposite failed")  # type: ignore[attr-defined]
        return BatchResult(
            frames=list(resp.composited_frames),  # type: ignore[attr-defined]
            background_frame_indices=list(resp.background_frame_indices),  # type: ignore[attr-defined]
            inference_time_ms=resp.inference_time_ms,  # type: ignore[attr-defined]
            composite_time_ms=resp.composite_time_ms,  # type: ignore[attr-defined]
            total_time_ms=resp.total_time_ms,  # type: ignore[attr-defined]
            stage_times_ms=dict(resp.stage_times_ms),  # type: ignore[attr-defined]
            gpu_id=resp.gpu_id,  # type: ignore[attr-defined]
        )

    def render(
        self,
        model_id: str,
        audio16k: np.ndarray,
        batch_size: int = 24,
        start_frame_idx: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        mode: str = "stream",
        in_flight: int = 2,
        pcm16: bool = True,
    ) -> Iterator[bytes]:
        """Yield every JPEG frame of one clip, in order.

        `audio16k` is the clip at 16 kHz mono (float32 in [-1, 1], or int16). It yields
        `clip_frames(len(audio16k))` frames; a clip shorter than 3000 samples is zero-padded
        to 3000 first (with a warning). Audio travels as 16-bit PCM (`pcm16=False`:
        float32).

        `mode="stream"` (default) sends the clip once through an offline StreamComposite
        session, whose cost per frame does not grow with the clip's length.
        `mode="batch"` uses InferBatchComposite requests of `batch_size` frames, each
        carrying the whole clip, up to `in_flight` at a time (for servers without
        streaming). Both give the same frames. `on_progress(done, total)` is called as
        frames arrive. Errors raise `LipsyncError`.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if mode not in ("stream", "batch"):
            raise ValueError("mode must be 'stream' or 'batch'")
        audio, padded = pad_audio(np.asarray(audio16k))
        if padded:
            log.warning(
                "audio shorter than %d samples (%.4f s): padded with silence",
                MIN_SAMPLES,
                MIN_SAMPLES / SAMPLE_RATE,
            )
        audio = to_pcm16(audio) if pcm16 else np.asarray(audio, dtype=np.float32)
        total = clip_frames(audio.size)
        if mode == "stream":
            return self._stream_frames(model_id, audio, start_frame_idx, total, on_progress)
        offsets = range(0, total, batch_size)

        def one(offset: int) -> BatchResult:
            return self.composite_batch(
                model_id,
                min(batch_size, total - offset),
                audio=audio,
                start_frame_idx=start_frame_idx + offset,
                clip_frame_offset=offset,
            )

        return self._ordered(offsets, one, total, max(1, in_flight), on_progress)

    def stream(
        self,
        model_id: str,
        chunks: Iterable[np.ndarray],
        *,
        sample_rate: int = SAMPLE_RATE,
        start_frame_idx: int = 0,
        realtime: bool = False,
        return_audio: bool = False,
        video_codec: str = "jpeg",
    ) -> Iterator[cpb.StreamFrame]:
        """A StreamComposite session: send audio chunks (float32 or int16 mono at
        `sample_rate`; all of one type), yield frames as they come. The clip ends when
        `chunks` is exhausted.

        `video_codec`: "jpeg" (each frame's `jpeg`, the default) or "h264" (each frame's
        `h264` access unit and `keyframe` flag; docs/DELIVERY.md). To send more than the
        audio while it streams (a keyframe request, an interrupt), use `open_stream`."""
        first: list[np.ndarray] = []
        it = iter(chunks)
        head = next(it, None)
        if head is not None:
            first.append(np.asarray(head))
        s16 = bool(first) and first[0].dtype == np.int16
        start = cpb.StreamStart(
            model_id=model_id,
            sample_rate=sample_rate,
            start_frame_idx=start_frame_idx,
            realtime=realtime,
            return_audio=return_audio,
            audio_encoding=cpb.PCM_S16LE if s16 else cpb.PCM_F32LE,
            video_codec=_video_codec(video_codec),
        )
        requests = clip_requests(start, [itertools.chain(first, it)])
        try:
            yield from self._stub.StreamComposite(requests, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, "StreamComposite") from None

    def open_stream(
        self,
        model_id: str,
        *,
        sample_rate: int = SAMPLE_RATE,
        start_frame_idx: int = 0,
        realtime: bool = True,
        return_audio: bool = True,
        pcm16: bool = True,
        max_pending: int = 256,
        video_codec: str = "jpeg",
    ) -> LiveStream:
        """Open a StreamComposite session driven by calls rather than by an iterator:
        `send_audio`, `end_of_audio`, `interrupt` and `request_keyframe` from any thread,
        frames by iterating the returned `LiveStream` (see there). For conversations and
        live viewers, where the audio, the interruptions and the keyframe requests are not
        known in advance; `stream` is the simpler form when they are. `video_codec` as for
        `stream`."""
        start = cpb.StreamStart(
            model_id=model_id,
            sample_rate=0 if sample_rate == SAMPLE_RATE else int(sample_rate),
            start_frame_idx=start_frame_idx,
            realtime=realtime,
            return_audio=return_audio,
            audio_encoding=cpb.PCM_S16LE if pcm16 else cpb.PCM_F32LE,
            video_codec=_video_codec(video_codec),
        )
        live = LiveStream(start, pcm16, max_pending)
        try:
            live._call = self._stub.StreamComposite(live._requests(), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc, "StreamComposite") from None
        live._error = lambda exc: self._error(exc, "StreamComposite")
        return live

    def _stream_frames(
        self,
        model_id: str,
        audio: np.ndarray,
        start_frame_idx: int,
        total: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> Iterator[bytes]:
        chunks = (audio[i : i + SAMPLE_RATE] for i in range(0, len(audio), SAMPLE_RATE))
        frames = self.stream(model_id, chunks, start_frame_idx=start_frame_idx)
        for done, frame in enumerate(frames, start=1):
            if on_progress is not None and (done % 25 == 0 or done == total):
                on_progress(done, total)
            yield frame.jpeg

    def _ordered(
        self,
        offsets: range,
        one: Callable[[int], BatchResult],
        total: int,
        in_flight: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> Iterator[bytes]:
        pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="lipsync-render")
        pending: deque[Future[BatchResult]] = deque()
        todo = iter(offsets)
        done = 0
        try:
            for offset in todo:
                pending.append(pool.submit(one, offset))
                if len(pending) >= in_flight:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(one, nxt))
                done += len(result.frames)
                if on_progress is not None:
                    on_progress(done, total)
                yield from result.frames
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)


def chunked(x: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """`x` in pieces of `n` samples (the last one shorter)."""
    return (x[i : i + n] for i in range(0, len(x), n))


def clip_requests(
    start: cpb.StreamStart, clips: Iterable[Iterable[np.ndarray]], pause_s: float = 0.0
) -> Iterator[cpb.StreamRequest]:
    """The requests of a StreamComposite session that sends whole clips: `start`, then
    each clip's chunks (int16 as s16le, anything else as f32le: `start.audio_encoding`
    must agree) followed by `end_of_audio`. `pause_s` sleeps after each chunk (a sender
    that speaks as it goes)."""
    yield cpb.StreamRequest(start=start)
    for clip in clips:
        for chunk in clip:
            x = np.asarray(chunk)
            data = x.astype("<i2").tobytes() if x.dtype == np.int16 else _as_f32_bytes(x)
            yield cpb.StreamRequest(audio=data)
            if pause_s:
                time.sleep(pause_s)
        yield cpb.StreamRequest(end_of_audio=True)


class LiveStream:
    """One open StreamComposite session (`LipsyncClient.open_stream`).

    `send_audio(samples)` queues a chunk (int16, or float32 in [-1, 1] with
    `pcm16=False`; mono at the stream's rate), `end_of_audio()` ends the current clip,
    `interrupt()` drops the speech the service has queued, `close()` ends the client's
    side (the service sends what is made, then ends), `cancel()` ends the call at once.
    Iterating yields the service's `StreamFrame`s; a failed call raises `LipsyncError`
    (its `code` is the gRPC status). At most `max_pending` messages wait to be sent:
    past that `send_audio` raises `LipsyncError` rather than hold unbounded audio for a
    service that does not read it.
    """

    _CLOSE = object()

    def __init__(self, start: cpb.StreamStart, pcm16: bool, max_pending: int):
        self._start = start
        self._pcm16 = pcm16
        self._pending: queue.Queue[object] = queue.Queue(maxsize=max(2, max_pending))
        self._closed = threading.Event()
        self._call: object = None
        self._error: Callable[[grpc.RpcError], LipsyncError] = lambda exc: LipsyncError(str(exc))

    def _requests(self) -> Iterator[cpb.StreamRequest]:
        yield cpb.StreamRequest(start=self._start)
        while True:
            msg = self._pending.get()
            if msg is self._CLOSE:
                return
            yield msg  # type: ignore[misc]

    def _put(self, msg: object) -> None:
        if self._closed.is_set():
            raise LipsyncError("the stream is closed")
        try:
            self._pending.put_nowait(msg)
        except queue.Full:
            raise LipsyncError(
                f"{self._pending.maxsize} stream messages wait to be sent: the service is not "
                "reading them"
            ) from None

    def send_audio(self, samples: np.ndarray) -> None:
        """Queue one chunk of mono samples (any length) for the current clip."""
        x = np.asarray(samples).reshape(-1)
        if x.size == 0:
            return
        data = to_pcm16(x).astype("<i2", copy=False).tobytes() if self._pcm16 else _as_f32_bytes(x)
        self._put(cpb.StreamRequest(audio=data))

    def end_of_audio(self) -> None:
        """The current clip is complete: the service makes its last frames now."""
        self._put(cpb.StreamRequest(end_of_audio=True))

    def interrupt(self) -> None:
        """Drop the speech queued or being made; the stream goes on (idle frames)."""
        self._put(cpb.StreamRequest(interrupt=True))

    def request_keyframe(self) -> None:
        """Make the next frame sent a keyframe (H.264 streams: a viewer joined or lost
        packets; JPEG streams ignore it)."""
        self._put(cpb.StreamRequest(request_keyframe=True))

    def close(self) -> None:
        """End the client's side: no more audio; the service finishes and ends."""
        if not self._closed.is_set():
            self._closed.set()
            with contextlib.suppress(queue.Full):
                self._pending.put_nowait(self._CLOSE)

    def cancel(self) -> None:
        """End the call now, from any thread (a blocked iteration raises and returns)."""
        self._closed.set()
        with contextlib.suppress(queue.Full):
            self._pending.put_nowait(self._CLOSE)
        if self._call is not None:
            self._call.cancel()  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[cpb.StreamFrame]:
        try:
            yield from self._call  # type: ignore[misc]
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed.is_set():  # type: ignore[attr-defined]
                return
            raise self._error(exc) from None


def _as_f32_bytes(x: np.ndarray | bytes) -> bytes:
    if isinstance(x, bytes | bytearray | memoryview):
        return bytes(x)
    return np.ascontiguousarray(x, dtype="<f4").tobytes()
