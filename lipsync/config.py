"""Configuration of both services: YAML with documented defaults, overridable by environment.

Precedence (lowest first): the defaults in this file, the YAML file named by
`LIPSYNC_CONFIG` (or passed explicitly), then environment variables:

- `AVATARS_DIR`                      -> avatars_dir
- `INFERENCE_ADDRESS`                -> compositing.inference_address
- `COMPOSITING_ADDRESS`              -> web.compositing_address (also the CLI's default server)
- `LIPSYNC_<SECTION>__<KEY>[__...]`  -> any field, e.g. `LIPSYNC_COMPOSITING__JPEG_QUALITY=90`,
  `LIPSYNC_INFERENCE__EXECUTION_PROVIDERS=cpu`, `LIPSYNC_LOG_LEVEL=DEBUG`.

Environment values are parsed as YAML scalars/lists (`8`, `true`, `[cuda, cpu]`, `cuda,cpu`).
`deploy/config.example.yaml` lists every field with its default.

A `LIPSYNC_*` variable is taken only when its path names a field (a leaf, not a section).
Others are ignored, not refused: Kubernetes injects service-link variables such as
`LIPSYNC_INFERENCE_SERVICE_HOST` and `LIPSYNC_INFERENCE_PORT` into every pod of a
namespace that has a Service named `lipsync-inference`, and those must not stop a
service from starting. `ignored_env_vars(env)` lists them; `load_config` logs the ones
that look like a mistyped field (they contain `__`) as a warning, the rest at debug.
A YAML file with an unknown key is still an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class LimitsConfig:
    """Request limits, enforced by both services."""

    max_batch_size: int = 1000  # frames per InferBatchComposite request (40 s of video)
    max_message_bytes: int = 512 * MiB  # gRPC send/receive limit
    max_audio_seconds: float = 600.0  # length of one raw audio clip


@dataclass
class RegistryConfig:
    """Which avatars' networks the inference service keeps in memory."""

    max_models: int = 8
    max_bytes: int = 8 * GiB  # size of the ONNX files, a proxy for session memory
    eviction: str = "lru"  # lru | lfu
    idle_unload_s: float = 0.0  # unload a model unused this long; 0 disables
    # model ids loaded at start ("*" = every avatar found, up to max_models)
    preload: list[str] = field(default_factory=lambda: ["*"])


@dataclass
class BatchingConfig:
    """Dynamic batching of concurrent requests in the inference service."""

    enabled: bool = True
    max_batch: int = 32  # frames per UNet run on a GPU
    # ... and on the CPU, where batch 1 measured fastest per frame, alone (make bench) and
    # end to end with 4 clients (1, 2, 4 alternated: 11.8, 11.6, 11.2 frames/s)
    cpu_max_batch: int = 1
    max_wait_ms: float = 2.0  # how long a run waits for more work to join


@dataclass
class TLSConfig:
    """TLS of a gRPC port (PEM files, re-read when they change; docs/SECURITY.md).
    No cert_file: plaintext."""

    cert_file: str | None = None
    key_file: str | None = None
    # Require client certificates signed by this CA (mutual TLS); unset: any client.
    client_ca_file: str | None = None
    # A plaintext port serving only grpc.health.v1 (Kubernetes' gRPC probes cannot
    # speak TLS); 0: none.
    health_port: int = 0


@dataclass
class ClientTLSConfig:
    """How a client verifies a TLS service and authenticates to it (PEM files).
    No ca_file: plaintext."""

    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None


@dataclass
class AuthConfig:
    """API keys on the client port (docs/SECURITY.md)."""

    # YAML list of {name, key_sha256, scopes, max_streams, max_frames_per_second};
    # unset: every caller may call everything.
    api_keys_file: str | None = None


@dataclass
class CompositingAdmissionConfig:
    """Load shedding on the client port (docs/RELIABILITY.md)."""

    # InferBatchComposite frames in progress; a request past it is refused at once
    # (RESOURCE_EXHAUSTED, `retry-after-ms` in the trailing metadata)
    max_inflight_frames: int = 256
    max_inflight_bytes: int = 2 * GiB  # request bytes of those requests
    retry_after_ms: int = 1000
    # retry an inference call that failed with UNAVAILABLE (the service restarting), waiting
    # for it, for this long (within the caller's deadline); 0: no retries
    inference_retry_s: float = 15.0
    health_watch_s: float = 1.0  # readiness follows the inference service's health; 0: off


@dataclass
class InferenceAdmissionConfig:
    """Load shedding on the inference port (docs/RELIABILITY.md)."""

    # Infer frames in progress; past it RESOURCE_EXHAUSTED (room for a compositing
    # service's batches and max_sessions streams of stream.max_batch frames)
    max_inflight_frames: int = 1024
    max_inflight_bytes: int = 4 * GiB  # request bytes of those calls
    retry_after_ms: int = 500


@dataclass
class InferenceConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    # Tried in order; unavailable ones are skipped with a log line. Names: cuda,
    # tensorrt, cpu (or full onnxruntime provider names).
    execution_providers: list[str] = field(default_factory=lambda: ["cuda", "cpu"])
    device_id: int = 0
    # Run the UNet in float16 on CUDA (the model is converted at load).
    cuda_fp16: bool = True
    # The UNet the CPU provider serves: float32, or int8 where the avatar package has an
    # int8 UNet (`lipsync-avatar quantize`) that passes its calibration check at load
    # (else float32, logged). avatar.yaml's `cpu_precision` decides per avatar. CUDA
    # keeps its float model (cuda_fp16).
    cpu_precision: str = "float32"
    # The check at load: mouth-region PSNR of int8 against float32 on the package's
    # check frames, mean and worst frame (dB); below either, the int8 UNet is refused.
    int8_min_mean_psnr_db: float = 38.0
    int8_min_worst_psnr_db: float = 32.0
    # Audio encoder used by avatars that ship none (avatars' own take precedence).
    shared_audio_encoder: str | None = None
    intra_op_threads: int = 0  # 0: onnxruntime's default (all cores)
    inter_op_threads: int = 1
    # onnxruntime's worker threads busy-wait for work between runs: faster hand-offs,
    # but the spinning takes CPU from anything sharing the cores (CPU-only deployments).
    allow_spinning: bool = False
    max_workers: int = 16  # gRPC handler threads
    admission: InferenceAdmissionConfig = field(default_factory=InferenceAdmissionConfig)
    metrics_port: int = 9101  # Prometheus /metrics over HTTP (docs/OPERATIONS.md); 0: off
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass
class FrameCacheConfig:
    """Avatars' background frames in the compositing service's memory: each avatar as its
    frame files' bytes (and the JPEG of each frame served), decoded a frame at a time into
    one LRU shared by all avatars (compositing_service/frames.py)."""

    max_avatars: int = 2000
    max_bytes: int = 6 * GiB  # frame files + cached JPEGs, all avatars together
    decoded_max_bytes: int = 1 * GiB  # the LRU of decoded frames
    preload: list[str] = field(default_factory=lambda: ["*"])  # "*" = every avatar found


@dataclass
class H264Config:
    """H.264 streams (StreamStart.video_codec = VIDEO_CODEC_H264; docs/DELIVERY.md)."""

    # FFmpeg encoder names, in order of preference: the service uses the first that opens
    # at start (libx264, libopenh264, h264_nvenc, ... where the FFmpeg build has them)
    encoder: list[str] = field(default_factory=lambda: ["libx264"])
    bitrate_kbps: int = 1500  # target and VBV ceiling per second of video
    keyframe_interval_s: float = 2.0  # an IDR picture this often (and on request)
    preset: str = "superfast"  # libx264's speed/quality preset (ultrafast .. veryslow)
    threads: int = 1  # encoder threads per stream (1: streams scale one per core share)


@dataclass
class StreamConfig:
    """StreamComposite sessions."""

    max_batch: int = 8  # frames per inference call
    jitter_ms: float = 30.0  # realtime: margin on top of the measured production time
    gap_flush_ms: float = 250.0  # realtime: end a clip the player waits on after this gap
    max_queued_frames: int = 256  # offline: made but unsent frames before pausing
    max_sessions: int = 64  # concurrent streams; more are refused (RESOURCE_EXHAUSTED)
    # audio received but not yet made into frames; past it the stream stops reading the
    # client's messages (gRPC flow control holds a sender that runs ahead)
    max_buffered_audio_s: float = 30.0
    h264: H264Config = field(default_factory=H264Config)


@dataclass
class RoutingConfig:
    """Routing of inference calls over several replicas, when `inference_address` names
    more than one (a comma-separated list, or `dns:///name:port`; docs/SCALING.md)."""

    refresh_s: float = 5.0  # re-resolve dns:/// names; adopt what replicas hold
    health_interval_s: float = 2.0  # grpc.health.v1 Check of every replica
    health_timeout_s: float = 1.0
    # An avatar's calls stay on its replica until that has this many calls in flight
    # (and spread_factor x the average); then the avatar spreads to one more replica.
    spread_min_inflight: int = 4
    spread_factor: float = 1.25
    spread_after: int = 8  # ... for this many calls in a row (a burst is not a trend)
    max_replicas_per_avatar: int = 0  # 0: no limit
    cool_s: float = 10.0  # a spread avatar quiet this long is drawn back one replica
    unload_on_drawback: bool = True  # and the replica it left unloads it
    # A cold avatar goes to the least-loaded of its first k replicas by rendezvous hash
    # (0: of all). Several compositing replicas: 2 keeps them from scattering an avatar.
    cold_choices: int = 0


@dataclass
class CompositingConfig:
    host: str = "0.0.0.0"
    port: int = 50052
    inference_address: str = "localhost:50051"
    inference_timeout_s: float = 60.0
    # InferBatchComposite works in chunks of this many frames: memory stays bounded and
    # one chunk's inference overlaps the previous chunk's paste and JPEG.
    inference_chunk: int = 32
    jpeg_quality: int = 90
    workers: int = 0  # threads for crop/paste/JPEG; 0: one per core
    max_workers: int = 32  # gRPC handler threads for unary calls (streams get their own)
    admission: CompositingAdmissionConfig = field(default_factory=CompositingAdmissionConfig)
    # Encoding of the mouth regions the inference service returns:
    # float32 (the design's default), float16 or uint8 (trunc(255 x), bit-exact too).
    transfer_dtype: str = "float32"
    metrics_port: int = 9102  # Prometheus /metrics over HTTP (docs/OPERATIONS.md); 0: off
    # lipsync_frames_total has a model_id label for the first this-many avatars served;
    # the rest count as "other" (bounded series with thousands of avatars).
    metrics_model_labels: int = 50
    frame_cache: FrameCacheConfig = field(default_factory=FrameCacheConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)  # the client port
    inference_tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)


@dataclass
class WebConfig:
    """The browser page and its WebSocket gateway (`python -m lipsync.web`)."""

    host: str = "127.0.0.1"  # the images set 0.0.0.0
    port: int = 8080
    compositing_address: str = "localhost:50052"
    compositing_tls: ClientTLSConfig = field(default_factory=ClientTLSConfig)
    # Origins (scheme://host[:port]) whose pages may open the WebSocket besides the
    # page's own origin; "*": any.
    allowed_origins: list[str] = field(default_factory=list)
    max_sessions: int = 64  # concurrent WebSocket sessions; more are refused (503)
    # WebRTC viewers (docs/DELIVERY.md): concurrent peer connections, more are refused
    # (503); STUN/TURN URLs given to the page and to the gateway's ICE agent
    # ("stun:host:3478", "turn:host:3478?transport=udp"), with the TURN credentials.
    webrtc_max_sessions: int = 16
    ice_servers: list[str] = field(default_factory=list)
    ice_username: str = ""
    ice_credential: str = ""


@dataclass
class TracingConfig:
    """OpenTelemetry traces (the `tracing` extra; docs/OPERATIONS.md)."""

    enabled: bool = False
    otlp_endpoint: str = ""  # OTLP/gRPC collector, e.g. http://otel-collector:4317
    sample_ratio: float = 1.0  # of traces started here (callers' sampling is kept)


@dataclass
class Config:
    avatars_dir: str = "avatars"
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line)
    access_log: str = "info"  # one line per RPC at: info | debug | off
    # on SIGTERM: NOT_SERVING at once, in-flight calls and streams get this long to finish
    shutdown_grace_s: float = 10.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    compositing: CompositingConfig = field(default_factory=CompositingConfig)
    web: WebConfig = field(default_factory=WebConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @property
    def avatars_path(self) -> Path:
        return Path(self.avatars_dir)


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(v, item, f"{where}[]") for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


ENV_PREFIX = "LIPSYNC_"
# Not a field: the file to read (see load_config).
_ENV_NOT_FIELDS = frozenset({"LIPSYNC_CONFIG"})


def _field_path(key: str) -> list[str] | None:
    """The field a `LIPSYNC_<SECTION>__<KEY>[__...]` variable names, or None when it names
    none (an unknown name, a section rather than a field, or not such a variable)."""
    if not key.startswith(ENV_PREFIX) or key in _ENV_NOT_FIELDS:
        return None
    path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
    cls: Any = Config
    for i, name in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return None
        tp = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        return path if i == len(path) - 1 else None
    return None  # the path ends at a section


def ignored_env_vars(env: typing.Mapping[str, str]) -> list[str]:
    """The `LIPSYNC_*` variables of `env` that name no config field (sorted), such as the
    service-link variables Kubernetes injects (`LIPSYNC_INFERENCE_SERVICE_HOST`, ...)."""
    return sorted(
        k
        for k in env
        if k.startswith(ENV_PREFIX) and k not in _ENV_NOT_FIELDS and _field_path(k) is None
    )


def _env_overrides(env: typing.Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def put(path: list[str], raw: str) -> None:
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None

    if env.get("AVATARS_DIR"):
        put(["avatars_dir"], env["AVATARS_DIR"])
    if env.get("INFERENCE_ADDRESS"):
        put(["compositing", "inference_address"], env["INFERENCE_ADDRESS"])
    if env.get("COMPOSITING_ADDRESS"):
        put(["web", "compositing_address"], env["COMPOSITING_ADDRESS"])
    for key, raw in env.items():
        path = _field_path(key)
        if path is not None:
            put(path, raw)
    # Values such as "cuda,cpu" parse as strings; _coerce splits them for lists.
    return out


def validate(cfg: Config) -> Config:
    if cfg.inference.registry.eviction not in ("lru", "lfu"):
        raise ConfigError("inference.registry.eviction must be 'lru' or 'lfu'")
    if not 1 <= cfg.compositing.jpeg_quality <= 100:
        raise ConfigError("compositing.jpeg_quality must be in 1..100")
    if cfg.compositing.transfer_dtype not in ("float32", "float16", "uint8"):
        raise ConfigError("compositing.transfer_dtype must be float32, float16 or uint8")
    _validate_h264(cfg.compositing.stream.h264)
    if cfg.limits.max_batch_size < 1:
        raise ConfigError("limits.max_batch_size must be at least 1")
    if min(cfg.inference.batching.max_batch, cfg.inference.batching.cpu_max_batch) < 1:
        raise ConfigError("inference.batching.max_batch and cpu_max_batch must be at least 1")
    if cfg.inference.cpu_precision not in ("float32", "int8"):
        raise ConfigError("inference.cpu_precision must be 'float32' or 'int8'")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError("log_format must be 'text' or 'json'")
    if cfg.access_log not in ("info", "debug", "off"):
        raise ConfigError("access_log must be 'info', 'debug' or 'off'")
    return cfg


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


def _validate_h264(h: H264Config) -> None:
    where = "compositing.stream.h264"
    if not h.encoder or not all(re.fullmatch(r"[a-z0-9_]+", n) for n in h.encoder):
        raise ConfigError(f"{where}.encoder must list FFmpeg encoder names, got {h.encoder}")
    if not 50 <= h.bitrate_kbps <= 100_000:
        raise ConfigError(f"{where}.bitrate_kbps must be in 50..100000")
    if not 0.1 <= h.keyframe_interval_s <= 60:
        raise ConfigError(f"{where}.keyframe_interval_s must be in 0.1..60")
    if h.preset not in X264_PRESETS:
        raise ConfigError(f"{where}.preset must be one of {', '.join(X264_PRESETS)}")
    if not 1 <= h.threads <= 16:
        raise ConfigError(f"{where}.threads must be in 1..16")


def from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from a (partial) mapping, defaults for the rest."""
    return validate(_build(Config, data, ""))


def load_config(
    path: str | Path | None = None, env: typing.Mapping[str, str] | None = None
) -> Config:
    """Defaults, then the YAML file (`path` or $LIPSYNC_CONFIG), then the environment."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or env.get("LIPSYNC_CONFIG")
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    for key in ignored_env_vars(env):
        if "__" in key:  # the config's separator: probably a mistyped field
            log.warning("environment variable %s names no config field; ignored", key)
        else:  # e.g. a Kubernetes service link (LIPSYNC_INFERENCE_SERVICE_HOST, ...)
            log.debug("environment variable %s names no config field; ignored", key)
    return from_dict(_merge(data, _env_overrides(env)))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
